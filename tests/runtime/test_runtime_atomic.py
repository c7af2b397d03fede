"""Atomic writes: all or nothing, and published with the modes a plain write would give."""

from __future__ import annotations

import os
import stat

import pytest

from diffcse_runtime.atomic import atomic_dir, atomic_file


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_published_file_and_folder_follow_the_umask(tmp_path):
    """Not mkstemp's 0600 / mkdtemp's 0700: what open() and mkdir() give under the umask."""
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_text("x")
    plain_dir.mkdir()
    with atomic_file(tmp_path / "a.txt", "w") as fh:
        fh.write("x")
    with atomic_dir(tmp_path / "d") as folder:
        (folder / "f").write_text("x")
    assert _mode(tmp_path / "a.txt") == _mode(plain_file)
    assert _mode(tmp_path / "d") == _mode(plain_dir)
    if _mode(plain_dir) & 0o044:  # a umask like 022 lets others read
        assert _mode(tmp_path / "d") & 0o044 and _mode(tmp_path / "a.txt") & 0o044


def test_a_failed_block_leaves_nothing_and_keeps_the_old_version(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target, "w") as fh:
        fh.write("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    folder = tmp_path / "model"
    with atomic_dir(folder) as tmp:  # ours, so overwrite may replace it
        (tmp / "keep").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(folder, overwrite=True) as tmp:
        (tmp / "keep").write_text("new")
        raise RuntimeError("crash")
    assert (folder / "keep").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.txt"]


def test_an_existing_folder_is_not_replaced_without_overwrite(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError), atomic_dir(tmp_path / "m"):
        pass

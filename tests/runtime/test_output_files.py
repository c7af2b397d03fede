"""Issue 23, defect 2: an output replaces only a regular file (or nothing).

`ln -s /proc/self/fd/1 o.json; diffcse-eval ... --json o.json` used to exit 0, print
nothing and turn the symlink into a file; a FIFO was replaced too. A symlink, FIFO,
socket, device or folder at an output's path is refused with one sentence naming it;
`-` and `/dev/stdout` write through to standard output. A folder on the way that is a
symlink is normal and fine.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest

from diffcse_runtime.atomic import atomic_file
from diffcse_runtime.cli import embed, evaluate_cmd
from diffcse_runtime.errors import DiffcseError
from tests.support.cli import refused, run
from tests.support.export_helpers import make_sts_dir


def special(tmp_path: Path, kind: str) -> Path:
    """An entry of `kind` at tmp_path/o.json; its refusal must name it."""
    path = tmp_path / "o.json"
    if kind == "symlink to stdout":
        path.symlink_to("/proc/self/fd/1")
    elif kind == "symlink to a file":
        (tmp_path / "target.json").write_text("the user's\n")
        path.symlink_to(tmp_path / "target.json")
    elif kind == "dangling symlink":
        path.symlink_to(tmp_path / "nowhere.json")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":  # bound in a short folder: AF_UNIX paths are limited to 107 bytes
        short = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(short / "s"))
        sock.close()
        os.rename(short / "s", path)
        short.rmdir()
    elif kind == "folder":
        path.mkdir()
    return path


KINDS = [
    ("symlink to stdout", "symbolic link"),
    ("symlink to a file", "symbolic link"),
    ("dangling symlink", "symbolic link"),
    ("fifo", "named pipe"),
    ("socket", "socket"),
    ("folder", "folder"),
]


@pytest.mark.parametrize(("kind", "said"), KINDS)
def test_atomic_file_refuses_anything_but_a_regular_file(tmp_path, kind, said):
    path = special(tmp_path, kind)
    before = os.lstat(path)
    with pytest.raises(DiffcseError, match=f"{path}: is .*{said}"), atomic_file(path, "w") as fh:
        fh.write("new")
    after = os.lstat(path)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    if kind == "symlink to a file":
        assert (tmp_path / "target.json").read_text() == "the user's\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_device_is_refused(tmp_path):
    """Our own null device node in tmp_path, never /dev's: as root, the defect replaced it."""
    dev = tmp_path / "null"
    try:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    with pytest.raises(DiffcseError, match=f"{dev}: is a device"), atomic_file(dev):
        pass
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


def test_a_special_file_that_appears_meanwhile_is_not_replaced(tmp_path):
    path = tmp_path / "o.json"
    with pytest.raises(DiffcseError, match="symbolic link"), atomic_file(path, "w") as fh:
        fh.write("new")
        path.symlink_to("/proc/self/fd/1")
    assert path.is_symlink()


def test_a_symlinked_folder_on_the_way_is_fine(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real")
    with atomic_file(tmp_path / "via" / "o.json", "w") as fh:
        fh.write("x")
    assert (tmp_path / "real" / "o.json").read_text() == "x"


@pytest.mark.parametrize("target", ["-", "/dev/stdout"])
def test_dash_and_dev_stdout_write_through(target, capsys):
    with atomic_file(target, "w") as fh:
        fh.write("text out\n")
    with atomic_file(target, "wb") as fh:
        fh.write(b"bytes out\n")
    assert capsys.readouterr().out == "text out\nbytes out\n"


def test_dev_stderr_writes_through_too(capsys):
    with atomic_file("/dev/stderr", "w") as fh:
        fh.write("to stderr\n")
    assert capsys.readouterr().err == "to stderr\n"


# ---------------------------------------------------------------- through the commands


@pytest.fixture
def sts(tmp_path) -> Path:
    return make_sts_dir(tmp_path / "sts", n_pairs=20)


@pytest.mark.parametrize(("kind", "said"), KINDS)
def test_eval_json_refuses_a_special_file_before_evaluating(
    tiny_model_dir, sts, tmp_path, kind, said
):
    path = special(tmp_path, kind)
    args = ["-m", tiny_model_dir, "--data", sts, "--split", "dev", "--json", path]
    before = os.lstat(path)
    res = run(evaluate_cmd, args)
    refused(res, str(path), said)
    assert "STSBenchmark" not in res.output  # refused before the evaluation ran
    assert os.lstat(path).st_ino == before.st_ino


@pytest.mark.parametrize("target", ["-", "/dev/stdout"])
def test_eval_json_to_stdout_writes_through(tiny_model_dir, sts, target):
    args = ["-m", tiny_model_dir, "--data", sts, "--split", "dev", "--json", target]
    res = run(evaluate_cmd, args)
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout[res.stdout.index("{") :])
    assert "STSBenchmark" in json.dumps(payload)


@pytest.mark.parametrize(("kind", "said"), [k for k in KINDS if k[0] != "folder"])
def test_embed_output_refuses_a_special_file_even_with_overwrite(
    tiny_model_dir, tmp_path, kind, said
):
    path = special(tmp_path, kind)
    npy = path.with_suffix(".npy")
    os.rename(path, npy)
    before = os.lstat(npy)
    res = run(embed, ["-", "-m", tiny_model_dir, "-o", npy, "--overwrite"], input="a\nb\n")
    refused(res, str(npy), said)
    assert os.lstat(npy).st_ino == before.st_ino


@pytest.mark.parametrize("target", ["-", "/dev/stdout"])
def test_embed_to_stdout_prints_json_lines(tiny_model_dir, target):
    res = run(embed, ["-", "-m", tiny_model_dir, "-o", target], input="a cat\nhello\n")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == ["a cat", "hello"]
    assert np.isfinite(np.asarray(rows[0]["embedding"])).all()


def test_training_metrics_are_never_appended_through_a_symlink(tmp_path):
    pytest.importorskip("torch")
    from diffcse_train.run_dir import RunDir

    (tmp_path / "elsewhere.txt").write_text("the user's\n")
    (tmp_path / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(DiffcseError, match="metrics.jsonl: is a symbolic link"):
        RunDir(tmp_path).append_metrics({"step": 1, "loss": 0.5})
    assert (tmp_path / "elsewhere.txt").read_text() == "the user's\n"

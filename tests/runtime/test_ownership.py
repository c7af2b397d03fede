"""Issue 23, defect 1: `--overwrite` replaces only a folder our own manifest accounts for.

A file's name proves nothing (`echo '{}' > p/index.json`): a folder is ours only when its
`.diffcse-manifest.json` parses, names the tool about to replace it and lists every entry
it holds. Never the working directory, nor a folder holding one of the command's inputs.
Each reproduction of the issue runs through the real command, and the user's files are
checked byte for byte afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffcse_runtime.atomic import atomic_dir
from diffcse_runtime.cli import search
from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.ownership import MANIFEST_FILE, NotOursError, check_owned
from tests.support.cli import refused, run

TOOL = "diffcse-search"


def user_folder(root: Path) -> dict[str, bytes]:
    """The issue's folder: p/thesis.tex and p/src/a.js; returns what must survive."""
    (root / "src").mkdir(parents=True)
    (root / "thesis.tex").write_text("t\n")
    (root / "src" / "a.js").write_text("c\n")
    return snapshot(root)


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def corpus(tmp_path) -> Path:
    c = tmp_path / "c.txt"
    c.write_text("a\nb\n")
    return c


# ---------------------------------------------------------------- the reproductions


@pytest.mark.parametrize("marker", ["index.json", "diffcse.json", "fit_report.json", None])
def test_search_overwrite_refuses_a_user_folder_with_or_without_a_fake_marker(
    tiny_model_dir, tmp_path, corpus, marker
):
    p = tmp_path / "p"
    user_folder(p)
    if marker:
        (p / marker).write_text("{}")
    before = snapshot(p)
    res = run(search, ["--index", p, "--build", corpus, "-m", tiny_model_dir, "--overwrite"])
    refused(res, str(p), "even with --overwrite")
    assert snapshot(p) == before


def test_our_index_with_a_foreign_file_subfolder_or_symlink_is_refused(
    tiny_model_dir, tmp_path, corpus
):
    idx = tmp_path / "idx"
    args = ["--index", idx, "--build", corpus, "-m", tiny_model_dir, "--overwrite"]
    assert run(search, args).exit_code == 0
    assert (idx / MANIFEST_FILE).is_file()
    assert run(search, args).exit_code == 0  # our own, untouched: replaced

    for name, make in [
        ("notes.txt", lambda e: e.write_text("mine")),
        ("drafts", lambda e: e.mkdir()),
        ("link", lambda e: e.symlink_to(tmp_path)),
    ]:
        entry = idx / name
        make(entry)
        refused(run(search, args), str(idx), f"holds {name}", "did not write")
        assert os.path.lexists(entry)
        entry.rmdir() if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    assert run(search, args).exit_code == 0


def test_the_working_directory_is_never_replaced(tiny_model_dir, tmp_path, corpus, monkeypatch):
    p = tmp_path / "p"
    idx_args = ["--build", corpus, "-m", tiny_model_dir]
    assert run(search, ["--index", p, *idx_args]).exit_code == 0  # even our own index
    (p / "thesis.tex").write_text("t\n")
    monkeypatch.chdir(p)
    before = snapshot(p)
    res = run(search, ["--index", ".", "--build", "../c.txt", "-m", tiny_model_dir, "--overwrite"])
    refused(res, "current working directory")
    assert snapshot(p) == before
    os.unlink(p / "thesis.tex")  # now wholly ours: still the cwd, still refused
    res = run(search, ["--index", ".", *idx_args, "--overwrite"])
    refused(res, "current working directory")
    monkeypatch.chdir(tmp_path)
    res = run(search, ["--index", tmp_path, *idx_args, "--overwrite"])  # holds the cwd
    refused(res, "current working directory")


def test_a_folder_holding_an_input_is_never_replaced(tiny_model_dir, tmp_path):
    p = tmp_path / "p"
    (p / "sub").mkdir(parents=True)
    inside = p / "sub" / "c.txt"
    inside.write_text("a\nb\n")
    res = run(search, ["--index", p, "--build", inside, "-m", tiny_model_dir, "--overwrite"])
    refused(res, str(p), "holds the input")
    assert inside.read_text() == "a\nb\n"


def test_an_index_cannot_replace_a_model_directory(tiny_model_dir, tmp_path, corpus):
    """The manifest names its tool: a model directory is not an index to replace."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert (model / MANIFEST_FILE).is_file()
    res = run(search, ["--index", model, "--build", corpus, "-m", model, "--overwrite"])
    refused(res, "diffcse-export", "not diffcse-search")
    assert (model / "model.onnx").is_file()


def test_a_folder_from_before_manifests_is_refused_with_how_to_remove_it(tmp_path):
    old = tmp_path / "old-index"
    old.mkdir()
    (old / "index.json").write_text('{"format_version": 1}')
    (old / "embeddings.npy").write_bytes(b"x")
    with pytest.raises(NotOursError, match=r"holds embeddings.npy.*older diffcse.*rm -r"):
        check_owned(old, TOOL, "an index folder")


# ---------------------------------------------------------------- the manifest itself


def test_the_manifest_lists_every_entry_and_its_kind(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, tool=TOOL) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    body = json.loads((out / MANIFEST_FILE).read_text())
    assert body["tool"] == TOOL and body["format"] == "diffcse-manifest"
    assert body["entries"] == [["a.txt", "file"], ["sub", "dir"], ["sub/b.bin", "file"]]
    check_owned(out, TOOL, "x")
    (out / "sub" / "user.txt").write_text("mine")  # deep inside is found too
    with pytest.raises(NotOursError, match="holds sub/user.txt"):
        check_owned(out, TOOL, "x")


@pytest.mark.parametrize(
    "manifest",
    ["{}", "not json", '{"format": "diffcse-manifest", "version": 1, "tool": "diffcse-search"}'],
)
def test_a_fake_or_broken_manifest_is_not_ours(tmp_path, manifest):
    p = tmp_path / "p"
    p.mkdir()
    (p / "thesis.tex").write_text("t")
    (p / MANIFEST_FILE).write_text(manifest)
    with pytest.raises(NotOursError, match="even with --overwrite"):
        check_owned(p, TOOL, "an index folder")


def test_a_symlink_to_our_folder_is_never_replaced(tmp_path):
    real = tmp_path / "real"
    with atomic_dir(real, tool=TOOL) as tmp:
        (tmp / "a").write_text("a")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(DiffcseError, match="symbolic link"), atomic_dir(link, True, TOOL) as tmp:
        (tmp / "b").write_text("b")
    assert link.is_symlink() and (real / "a").read_text() == "a"


def test_an_empty_folder_is_fine_to_fill(tmp_path):
    (tmp_path / "e").mkdir()
    with atomic_dir(tmp_path / "e", overwrite=True, tool=TOOL) as tmp:
        (tmp / "a").write_text("a")
    assert (tmp_path / "e" / "a").read_text() == "a"


# ---------------------------------------------------------------- export, fit-generator, train


@pytest.mark.slow
def test_export_overwrite_refuses_a_fake_diffcse_json_and_the_cwd(tiny_bert, tmp_path, monkeypatch):
    from diffcse_export.cli import main

    def export(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    p = tmp_path / "p"
    user_folder(p)
    (p / "diffcse.json").write_text("{}")
    before = snapshot(p)
    refused(export(tiny_bert, p, "--overwrite", "--quiet"), str(p), "even with --overwrite")
    assert snapshot(p) == before
    (tmp_path / "e").mkdir()
    monkeypatch.chdir(tmp_path / "e")
    refused(export(tiny_bert, ".", "--overwrite", "--quiet"), "current working directory")
    monkeypatch.chdir(Path(__file__).parent)
    refused(export(tiny_bert, tiny_bert.parent, "--overwrite"), "holds the input")


def test_fit_generator_overwrite_refuses_a_fake_fit_report(tiny_bert, tmp_path):
    from diffcse_train.cli import fit_generator_cmd

    corpus = tmp_path / "c.txt"
    corpus.write_text("one sentence .\n" * 50)
    p = tmp_path / "p"
    user_folder(p)
    (p / "fit_report.json").write_text("{}")
    before = snapshot(p)
    args = ["--encoder", tiny_bert, "--corpus", corpus, "--out", p, "--overwrite", "--quiet"]
    refused(run(fit_generator_cmd, args), str(p), "even with --overwrite")
    assert snapshot(p) == before
    args = ["--encoder", tiny_bert, "--corpus", corpus, "--out", tmp_path, "--overwrite"]
    refused(run(fit_generator_cmd, args), "holds the input")


def test_a_training_run_overwrite_replaces_only_what_the_run_wrote(tmp_path):
    from diffcse_train.run_dir import RUN_RECORD, RunDir

    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "trainer_state.json").write_text("{}")  # a fake marker, no manifest
    with pytest.raises(NotOursError, match="best"):
        RunDir(out).check(None, resume=False, overwrite=True)
    (out / "best" / "trainer_state.json").unlink()
    (out / "best").rmdir()
    (out / "summary.json").write_text('{"mine": 1}')  # the user's file of that name
    with pytest.raises(NotOursError, match=f"summary.json: no {RUN_RECORD}"):
        RunDir(out).check(None, resume=False, overwrite=True)
    (out / "summary.json").unlink()
    run_dir = RunDir(out)
    run_dir.start(type("Cfg", (), {"to_yaml": lambda self: "a: 1\n"})(), [])
    (out / "summary.json").write_text("{}")  # as the run writes it: claimed by the record
    (out / "notes.txt").write_text("kept")
    replaced = RunDir(out).check(None, resume=False, overwrite=True)
    assert sorted(p.name for p in replaced) == ["summary.json", "train_config.yaml"]


def test_a_users_config_in_output_dir_is_never_rewritten(tmp_path):
    from diffcse_train.run_dir import RunDir

    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.yaml").write_text("# my notes\nlearning_rate: 1e-5\n")
    with pytest.raises(DiffcseError, match="already holds a training run"):
        RunDir(out).check(None, resume=False, overwrite=False)
    with pytest.raises(NotOursError, match="train_config.yaml: no .diffcse-run.json"):
        RunDir(out).check(None, resume=False, overwrite=True)
    assert (out / "train_config.yaml").read_text().startswith("# my notes")


def test_train_overwrite_refuses_a_user_export_dir_before_training(tmp_path):
    """Not after hours of training: the export target is checked when the run starts."""
    from types import SimpleNamespace

    from diffcse_train.release import check_before_training

    target = tmp_path / "model"
    before = user_folder(target)
    (target / "diffcse.json").write_text("{}")
    cfg = SimpleNamespace(export_dir=str(target), export_variants="")
    with pytest.raises(NotOursError, match="even with --overwrite"):
        check_before_training(cfg, overwrite=True)
    assert snapshot(target) == {**before, "diffcse.json": b"{}"}


def test_a_file_added_between_the_check_and_the_swap_is_kept(tmp_path, monkeypatch):
    """The folder is checked once more after it is moved aside, where no one can add to it
    by name: a file the user wrote just after the first check puts it back untouched."""
    from diffcse_runtime import atomic

    out = tmp_path / "idx"
    with atomic_dir(out, tool=TOOL) as tmp:
        (tmp / "a").write_text("old")
    real = atomic.check_replaceable
    calls = []

    def check_then_user_writes(path, *args):
        real(path, *args)
        calls.append(path)
        if len(calls) == 2:  # the check at publish time: the user writes right after it
            (Path(path) / "late.txt").write_text("mine")

    monkeypatch.setattr(atomic, "check_replaceable", check_then_user_writes)
    with (
        pytest.raises(NotOursError, match=f"{out}: holds late.txt"),
        atomic_dir(out, True, TOOL) as tmp,
    ):
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "old" and (out / "late.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]

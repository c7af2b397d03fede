"""Issue 12, one test per defect of the runtime and its CLIs: no path loses a user's file,
every bad input is one sentence (exit 1, no traceback), no silent wrong answer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from diffcse_runtime import Encoder, load_metadata
from diffcse_runtime.atomic import atomic_dir, atomic_file, remove_stale
from diffcse_runtime.cli import embed, evaluate_cmd, search
from diffcse_runtime.errors import DiffcseError, ModelDirError
from diffcse_runtime.retrieval import Index
from tests.support.cli import refused, run


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return Encoder(tiny_model_dir)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


@pytest.fixture
def index_dir(tiny_model_dir, tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text("a cat is eating an apple .\ntwo dogs bought a red car .\nhello\n")
    idx = tmp_path / "idx"
    assert run(search, ["--index", idx, "--build", src, "-m", tiny_model_dir]).exit_code == 0
    return idx


# ---------------------------------------------------------------- 1: search --overwrite


def test_search_overwrite_refuses_a_folder_that_is_not_an_index(tiny_model_dir, tmp_path):
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("x")
    corp = tmp_path / "corp.txt"
    corp.write_text("one\ntwo\n")
    res = run(search, ["--index", docs, "--build", corp, "-m", tiny_model_dir, "--overwrite"])
    refused(res, str(docs), "not an index folder", "even with --overwrite")
    assert (docs / "thesis.tex").read_text() == "x"
    res = run(search, ["--index", corp, "--build", corp, "-m", tiny_model_dir, "--overwrite"])
    refused(res, str(corp))
    assert corp.read_text() == "one\ntwo\n"


def test_search_overwrite_replaces_its_own_index(index_dir, tiny_model_dir, tmp_path):
    corp = tmp_path / "new.txt"
    corp.write_text("only one\n")
    res = run(search, ["--index", index_dir, "--build", corp, "-m", tiny_model_dir, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads((index_dir / "index.json").read_text())["size"] == 1


# ---------------------------------------------------------------- 2: the atomic_dir race


def test_a_folder_that_appears_meanwhile_is_never_swapped_out(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError), atomic_dir(out) as tmp:
        (tmp / "model.onnx").write_text("new")
        out.mkdir()  # the user creates it while the export runs
        (out / "notes.txt").write_text("n")
    assert (out / "notes.txt").read_text() == "n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_does_not_replace_a_user_folder_that_appeared(tmp_path):
    out = tmp_path / "idx"
    with (
        pytest.raises(DiffcseError, match="not an index"),
        atomic_dir(out, overwrite=True, tool="diffcse-search", what="an index") as tmp,
    ):
        (tmp / "index.json").write_text("{}")
        out.mkdir()
        (out / "notes.txt").write_text("n")
    assert (out / "notes.txt").read_text() == "n"


def test_nested_atomic_dir_on_the_same_path_is_an_error(tmp_path):
    with atomic_dir(tmp_path / "x") as outer:
        (outer / "a").write_text("1")
        with (
            pytest.raises(RuntimeError, match="already being written"),
            atomic_dir(tmp_path / "x", overwrite=True),
        ):
            pass
    assert (tmp_path / "x" / "a").read_text() == "1"


def test_atomic_file_without_overwrite_keeps_a_file_that_appeared(tmp_path):
    out = tmp_path / "o.txt"
    with pytest.raises(FileExistsError), atomic_file(out, "w", overwrite=False) as fh:
        fh.write("new")
        out.write_text("user")
    assert out.read_text() == "user"
    assert [p.name for p in tmp_path.iterdir()] == ["o.txt"]


# ---------------------------------------------------------------- 3/4: diffcse-embed


def test_embed_refuses_an_existing_output_and_its_own_input(tiny_model_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for extra in ([], ["--overwrite"]):
        res = run(embed, [notes, "-m", tiny_model_dir, "-o", notes, *extra])
        assert res.exit_code == 1 and "Traceback" not in res.output
    (tmp_path / "notes.jsonl").symlink_to(notes)
    res = run(embed, [notes, "-m", tiny_model_dir, "-o", tmp_path / "notes.jsonl", "--overwrite"])
    refused(res, "is the input file itself")
    assert notes.read_text() == "my notes\n"
    out = tmp_path / "out.npy"
    out.write_bytes(b"precious")
    refused(run(embed, [notes, "-m", tiny_model_dir, "-o", out]), "already exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    assert run(embed, [notes, "-m", tiny_model_dir, "-o", out, "--overwrite"]).exit_code == 0
    assert np.load(out).shape == (1, 32)


def test_failed_stdin_run_leaves_no_copy_of_the_input(tiny_model_dir, tmp_path, monkeypatch):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool_dir))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    res = run(embed, ["-", "-m", tiny_model_dir, "-o", tmp_path / "o.npy"], input=b"ok\n\xff\n")
    refused(res, ":2: not valid UTF-8")
    assert list(spool_dir.iterdir()) == []
    assert not (tmp_path / "o.npy").exists()


# ---------------------------------------------------------------- 6: diffcse-eval


def _stsb(root, rows: list[str]):
    d = root / "STSBenchmark"
    d.mkdir(parents=True)
    good = [
        f"main\tx\t2012\t{i:04d}\t{i % 5}.0\tsent a{i} here\tsent b{i} there" for i in range(12)
    ]
    (d / "sts-dev.csv").write_text("\n".join(good + rows) + "\n")
    sick = root / "SICK"
    sick.mkdir()
    head = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"
    lines = [f"{i}\tsick a{i}\tsick b{i}\t{1 + i % 4}.5\tNEUTRAL" for i in range(12)]
    (sick / "SICK_trial.txt").write_text("\n".join([head, *lines]) + "\n")
    return root


def test_eval_without_tasks_fails_on_a_malformed_task(tiny_model_dir, tmp_path):
    data = _stsb(tmp_path / "data", ["main\tonly\tthree"])
    res = run(evaluate_cmd, ["-m", tiny_model_dir, "--data", data, "--split", "dev"])
    refused(res, "sts-dev.csv:13:", "columns")


def test_eval_refuses_a_nan_gold_score(tiny_model_dir, tmp_path):
    data = _stsb(tmp_path / "data", ["main\tx\t2012\t0099\tnan\tsent a\tsent b"])
    res = run(evaluate_cmd, ["-m", tiny_model_dir, "--data", data, "--split", "dev"])
    refused(res, "sts-dev.csv:13:", "'nan'", "not a finite number")


def test_eval_checks_json_output_before_evaluating(tiny_model_dir, tmp_path, monkeypatch):
    import diffcse_runtime.sts as sts

    def never(*a, **k):
        raise AssertionError("evaluated before checking --json")

    monkeypatch.setattr(sts, "evaluate", never)
    data = _stsb(tmp_path / "data", [])
    res = run(
        evaluate_cmd, ["-m", tiny_model_dir, "--data", data, "--json", tmp_path / "no/r.json"]
    )
    refused(res, "no/r.json", "does not exist")


# ---------------------------------------------------------------- 7/10: the index


def test_nan_rows_are_refused_at_build_and_at_load(index_dir, encoder):
    with pytest.raises(DiffcseError, match="row 1 holds NaN"):
        Index(np.array([[1.0, 0.0], [np.nan, 1.0]], np.float32), ["a", "b"])
    emb = np.load(index_dir / "embeddings.npy")
    emb[1, 3] = np.nan
    np.save(index_dir / "embeddings.npy", emb)  # same size; the sample hash tells
    res = run(search, ["--index", index_dir, "hello"])
    refused(res, "embeddings.npy", "checksum does not match", "rebuild the index")
    meta = json.loads((index_dir / "index.json").read_text())
    del meta["checksums"]  # an index from before checksums: the NaN row itself is named
    (index_dir / "index.json").write_text(json.dumps(meta))
    refused(run(search, ["--index", index_dir, "hello"]), "row 1 holds NaN")


def test_full_verification_catches_a_change_in_the_middle(index_dir, tmp_path, monkeypatch):
    import diffcse_runtime.retrieval as retrieval

    monkeypatch.setattr(retrieval, "SAMPLE_BYTES", 64)  # the change lies outside the sample
    idx = tmp_path / "idx2"
    texts = [f"text {i}" for i in range(40)]
    Index(np.random.default_rng(0).normal(size=(40, 32)).astype(np.float32), texts).save(idx)
    emb = np.load(idx / "embeddings.npy")
    emb[20] = -emb[20]
    np.save(idx / "embeddings.npy", emb)
    assert len(Index.load(idx)) == 40  # cheap check: size and the sampled bytes agree
    with pytest.raises(DiffcseError, match="checksum does not match"):
        Index.load(idx, verify="full")


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda d: (d / "embeddings.npy").write_bytes(b"\x93NUMPY garbage"), "embeddings.npy"),
        (lambda d: (d / "index.json").write_text("{not json"), "index.json: not valid JSON"),
        (lambda d: (d / "texts.jsonl").write_bytes(b'"a"\n\xff\n"c"\n'), "texts.jsonl:2:"),
        (lambda d: (d / "texts.jsonl").write_text('"a"\n{oops\n"c"\n'), "texts.jsonl:2:"),
    ],
)
def test_corrupt_index_files_are_one_sentence(index_dir, damage, phrase):
    meta = json.loads((index_dir / "index.json").read_text())
    meta.pop("checksums")  # show each reader's own message, not the checksum's
    (index_dir / "index.json").write_text(json.dumps(meta))
    damage(index_dir)
    refused(run(search, ["--index", index_dir, "hello"]), phrase)


def test_truncated_embeddings_and_a_non_index_folder(index_dir, tmp_path, monkeypatch):
    path = index_dir / "embeddings.npy"
    path.write_bytes(path.read_bytes()[:-50])
    refused(run(search, ["--index", index_dir, "hello"]), "embeddings.npy", "bytes")
    monkeypatch.chdir(tmp_path)
    refused(run(search, ["--index", ".", "hello"]), "not an index folder")


# ---------------------------------------------------------------- 8: the model directory


def test_an_edited_tokenizer_is_caught_and_fails_the_same_model_check(
    model_copy, index_dir, tiny_model_dir
):
    tok = model_copy / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"[UNK]"', '"[UNKX]"', 1))
    with pytest.raises(ModelDirError, match="tokenizer.json: SHA-256"):
        load_metadata(model_copy)
    # re-record the hashes (as a re-export would): the files map now differs from the index's
    meta = load_metadata(model_copy, verify_hash=False)
    from diffcse_runtime.model_dir import write_metadata

    write_metadata(model_copy, meta)
    res = run(search, ["--index", index_dir, "-m", model_copy, "hello"])
    refused(res, "not the model this index was built with", "tokenizer.json")


def test_an_old_model_dir_with_only_onnx_sha256_still_loads(model_copy, encoder):
    path = model_copy / "diffcse.json"
    raw = json.loads(path.read_text())
    assert set(raw["files"]) >= {"model.onnx", "tokenizer.json"}
    del raw["files"]
    del raw["metadata_sha256"]  # folders from before either key had neither
    path.write_text(json.dumps(raw))
    np.testing.assert_allclose(Encoder(model_copy).encode("hi"), encoder.encode("hi"), atol=1e-6)


@pytest.mark.parametrize(
    "key, value",
    [
        ("embedding_dim", "abc"),
        ("embedding_dim", True),
        ("input_names", None),
        ("input_names", ["input_ids", "attention_mask", "pixels"]),
        ("max_seq_length", 100000),
        ("max_seq_length", 0),
        ("pad_token_id", -1),
        ("normalized", "yes"),
        ("pooling", "max"),
        ("files", {"model.onnx": "xyz"}),
        ("files", {"../model.onnx": "0" * 64, "model.onnx": "0" * 64}),
        ("validation", []),
    ],
)
def test_every_metadata_field_is_validated(model_copy, key, value):
    path = model_copy / "diffcse.json"
    raw = json.loads(path.read_text())
    raw[key] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelDirError, match=f"key '{key}'"):
        load_metadata(model_copy)
    res = run(embed, ["-", "-m", model_copy, "-o", model_copy.parent / "o.npy"], input="x\n")
    refused(res, "diffcse.json", f"'{key}'")


# ---------------------------------------------------------------- 12: messages


def test_messages_name_the_users_path_not_the_temporary_file(tiny_model_dir, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x\n")
    line = refused(run(embed, [src, "-m", tiny_model_dir, "-o", tmp_path / "nodir/out.npy"]))
    assert "nodir/out.npy" in line and ".tmp" not in line
    with (
        pytest.raises(DiffcseError, match="nodir/f.txt: cannot write it") as info,
        atomic_file(tmp_path / "nodir" / "f.txt", "w"),
    ):
        pass
    assert ".tmp" not in str(info.value)


def test_search_build_has_the_errors_option_its_message_suggests(tiny_model_dir, tmp_path):
    src = tmp_path / "docs.txt"
    src.write_bytes(b"good\nbad \xff byte\n")
    res = run(search, ["--index", tmp_path / "i", "--build", src, "-m", tiny_model_dir])
    refused(res, "docs.txt:2: not valid UTF-8", "--errors replace")
    res = run(
        search,
        ["--index", tmp_path / "i", "--build", src, "-m", tiny_model_dir, "--errors", "replace"],
    )
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- 5/13: modes and leftovers


def test_staged_files_get_umask_modes_even_when_written_0600(tmp_path):
    from safetensors.numpy import save_file

    with atomic_dir(tmp_path / "best") as tmp:
        save_file({"w": np.zeros(3, np.float32)}, str(tmp / "model.safetensors"))
        os.chmod(tmp / "model.safetensors", 0o600)  # as safetensors' torch writer leaves it
    mode = stat.S_IMODE((tmp_path / "best" / "model.safetensors").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_stale_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale_file = tmp_path / f".out.npy.{dead}.abc123.tmp"
    stale_file.write_bytes(b"x" * 100)
    stale_dir = tmp_path / f".out.npy.{dead}.def456.tmp"
    stale_dir.mkdir()
    live = tmp_path / f".out.npy.{os.getppid()}.zzz.tmp"
    live.write_bytes(b"x")
    other = tmp_path / ".notes.txt.123.tmp"
    other.write_text("not ours to judge")
    with atomic_file(tmp_path / "out.npy", "wb") as fh:
        fh.write(b"new")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["out.npy", live.name, other.name])
    assert remove_stale(tmp_path / "out.npy") == []


def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    code = (
        "import os, signal, sys, time\n"
        "from diffcse_runtime.atomic import atomic_file\n"
        "from diffcse_runtime.cli_errors import friendly_errors\n"
        "import click\n"
        "@click.command()\n"
        "@friendly_errors\n"
        "def main():\n"
        f"    with atomic_file({str(tmp_path / 'o.bin')!r}) as fh:\n"
        "        fh.write(b'half'); fh.flush(); print('ready', flush=True); time.sleep(30)\n"
        "main()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_threads_do_not_break_sigterm_handling(tmp_path):
    """sigterm_as_interrupt is a no-op outside the main thread (signal.signal would raise)."""
    from diffcse_runtime.signals import sigterm_as_interrupt

    failures = []

    def work():
        try:
            with sigterm_as_interrupt():
                time.sleep(0.01)
        except Exception as exc:  # pragma: no cover - the failure being tested for
            failures.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert failures == []


def test_signals_deferred_holds_sigterm_until_the_block_ends():
    """A SIGTERM that arrives while a worker is being spawned is raised after the spawn, so
    the half-started worker never sees its parent vanish (its EOFError traceback)."""
    from diffcse_runtime.signals import Terminated, signals_deferred, sigterm_as_interrupt

    finished, before = [], signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt():
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now; it only recorded the signal
            finished.append(True)
        finished.append("not reached")  # pragma: no cover - Terminated is raised above
    assert finished == [True]
    assert signal.getsignal(signal.SIGTERM) == before  # every handler is put back


def test_a_write_error_names_the_users_file(tmp_path):
    """A full disk (here: a file-size limit) names out.bin, not the hidden temporary."""
    code = (
        "import resource, signal, sys\n"
        "from diffcse_runtime.atomic import atomic_file\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        f"    with atomic_file({str(tmp_path / 'out.bin')!r}) as fh:\n"
        "        fh.write(b'x' * 100000)\n"
        "except OSError as exc:\n"
        "    print(exc.filename, exc.strerror)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.startswith(str(tmp_path / "out.bin") + " "), proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []

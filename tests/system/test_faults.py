"""Fault injection (issue 12): SIGTERM and SIGKILL at chosen points of real runs.

For diffcse-embed, diffcse-export, diffcse-search --build and diffcse-train (tiny models,
real subprocesses) each kill point checks that no file the user had changed, that no
final output is half-written, that SIGTERM cleans up at once (exit 143), and that after a
SIGKILL the next run of the same command removes the dead run's leftovers. Training
resumes from its last checkpoint after both.

Kill points are found by watching the file system, not by sleeping: the hidden temporary
output or staging folder exists (mid-write), an input pipe is open (mid-input), or a new
checkpoint has landed (mid-training).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support import tiny

pytestmark = [pytest.mark.faults, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENTRY = {
    "embed": "from diffcse_runtime.cli import embed as m; m()",
    "search": "from diffcse_runtime.cli import search as m; m()",
    "export": "from diffcse_export.cli import main as m; m()",
    "train": "from diffcse_train.cli import main as m; m()",
}


def start(tool: str, *args, tmp: Path, **kw) -> subprocess.Popen:
    log = open(tmp / f"{tool}-{time.monotonic_ns()}.log", "w+b")  # noqa: SIM115 - read later
    cmd = [sys.executable, "-c", ENTRY[tool], *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=log, **kw)
    proc.log = log
    return proc


def output_of(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read().decode(errors="replace")


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    proc.wait(timeout=timeout)
    out = output_of(proc)
    assert proc.returncode == 0, out[-3000:]
    return out


def wait_until(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `cond` every 5 ms; fail if the process ends first (the kill point was missed)."""
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"process ended before the kill point: {output_of(proc)[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.005)


def kill(proc: subprocess.Popen, sig: int) -> str:
    proc.send_signal(sig)
    proc.wait(timeout=60)
    out = output_of(proc)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, out[-3000:]
        assert "interrupted" in out and "Traceback" not in out, out[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL
    return out


def temporaries(folder: Path) -> list[str]:
    """Hidden .NAME.PID.*.tmp entries of our tools."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


def snapshot(folder: Path) -> dict[str, str]:
    """Every visible file under `folder` with its hash (what the user would see)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A folder with the user's own file beside every output."""
    d = tmp_path / "work"
    d.mkdir()
    (d / "notes.txt").write_text("the user's notes\n")
    return d


# ---------------------------------------------------------------- diffcse-embed


def test_embed_killed_mid_write_keeps_the_old_output(tiny_model_dir, user_dir, tmp_path):
    src = user_dir / "corpus.txt"
    src.write_text("\n".join(tiny.corpus(5000, seed=3) * 4) + "\n")
    out = user_dir / "out.npy"
    out.write_bytes(b"the previous output")
    before = snapshot(user_dir)
    # one process: worker processes' own shutdown belongs to diffcse_runtime.parallel's tests
    args = (src, "-m", tiny_model_dir, "-o", out, "--overwrite", "--batch-size", 8)
    args += ("--processes", 1)

    def writing(proc) -> bool:  # this process's own temporary output exists
        return any(n.startswith(f".out.npy.{proc.pid}.") for n in temporaries(user_dir))

    proc = start("embed", *args, tmp=tmp_path)
    wait_until(lambda: writing(proc), proc)
    kill(proc, signal.SIGTERM)
    assert snapshot(user_dir) == before and temporaries(user_dir) == []

    proc = start("embed", *args, tmp=tmp_path)
    wait_until(lambda: writing(proc), proc)
    kill(proc, signal.SIGKILL)
    assert snapshot(user_dir) == before
    assert temporaries(user_dir), "SIGKILL skips cleanup: the dead run's temporary remains"

    finish(start("embed", *args, tmp=tmp_path))
    assert temporaries(user_dir) == []
    assert np.load(out).shape == (20000, 32)
    assert (user_dir / "notes.txt").read_text() == "the user's notes\n"


def test_embed_from_a_pipe_killed_mid_input_leaves_no_copy(tiny_model_dir, user_dir, tmp_path):
    spool = tmp_path / "tmpdir"
    spool.mkdir()
    out = user_dir / "out.jsonl"
    before = snapshot(user_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        env_tmp = {**ENV, "TMPDIR": str(spool)}
        log = open(tmp_path / f"pipe-{sig}.log", "w+b")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-c", ENTRY["embed"], "-", "-m", str(tiny_model_dir), "-o", str(out)],
            cwd=ROOT, env=env_tmp, stdin=subprocess.PIPE, stdout=log, stderr=log,
        )  # fmt: skip
        proc.log = log
        proc.stdin.write(("secret line\n" * 2000).encode())
        proc.stdin.flush()  # the rest never comes: the run is killed mid-input
        time.sleep(1.0)
        kill(proc, sig)
        proc.stdin.close()
        copies = [p for p in spool.rglob("*") if p.is_file() and b"secret" in p.read_bytes()]
        assert copies == [], "a copy of the piped input was left on disk"
        assert snapshot(user_dir) == before and temporaries(user_dir) == []


# ---------------------------------------------------------------- diffcse-export


def test_export_killed_while_staging(tiny_bert, user_dir, tmp_path):
    out = user_dir / "model"
    args = (tiny_bert, out, "--sts-data", tmp_path / "no-sts", "--quiet")
    before = snapshot(user_dir)

    def staging(proc) -> bool:  # this process's own staging folder exists
        return any(n.startswith(f".model.{proc.pid}.") for n in temporaries(user_dir))

    proc = start("export", *args, tmp=tmp_path)
    wait_until(lambda: staging(proc), proc)
    kill(proc, signal.SIGKILL)
    assert not out.exists() and temporaries(user_dir)
    assert snapshot(user_dir) == before

    proc = start("export", *args, tmp=tmp_path)  # removes the dead run's staging folder
    wait_until(lambda: staging(proc) and len(temporaries(user_dir)) == 1, proc)
    kill(proc, signal.SIGTERM)
    assert not out.exists() and temporaries(user_dir) == []
    assert snapshot(user_dir) == before

    finish(start("export", *args, tmp=tmp_path))
    assert temporaries(user_dir) == []
    from diffcse_runtime import Encoder

    assert Encoder(out).encode("a cat").shape == (32,)


# ---------------------------------------------------------------- diffcse-search --build


def test_search_build_killed_mid_input_keeps_the_old_index(tiny_model_dir, user_dir, tmp_path):
    from click.testing import CliRunner

    from diffcse_runtime.cli import search

    idx = user_dir / "idx"
    first = user_dir / "first.txt"
    first.write_text("a cat is eating an apple .\nhello there\n")
    res = CliRunner().invoke(
        search, ["--index", str(idx), "--build", str(first), "-m", str(tiny_model_dir)]
    )
    assert res.exit_code == 0, res.output
    before = snapshot(user_dir)
    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)
    args = ("--index", idx, "--build", fifo, "-m", tiny_model_dir, "--overwrite")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = start("search", *args, tmp=tmp_path)
        with open(fifo, "w") as writer:  # returns once the process opened its input
            writer.write("two dogs bought a red car .\n" * 500)
            writer.flush()
            time.sleep(0.2)
            kill(proc, sig)
        assert snapshot(user_dir) == before and temporaries(user_dir) == []

    second = user_dir / "second.txt"
    second.write_text("two dogs bought a red car .\n")
    finish(start("search", "--index", idx, "--build", second, "-m", tiny_model_dir,
                 "--overwrite", "-k", "1", "--json", "red car", tmp=tmp_path))  # fmt: skip
    assert json.loads((idx / "index.json").read_text())["size"] == 1
    assert temporaries(user_dir) == []


# ---------------------------------------------------------------- diffcse-train


def test_train_killed_twice_resumes_to_the_end(tiny_bert, user_dir, tmp_path):
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(tiny.corpus(480, seed=4)) + "\n")
    out = user_dir / "run"
    out.mkdir()
    (out / "README.txt").write_text("the user's own file inside output_dir\n")
    from diffcse_train.config import TrainConfig

    cfg = TrainConfig(
        model_name_or_path=str(tiny_bert), train_file=str(corpus), output_dir=str(out),
        lambda_weight=0.0, augmentation="none", batch_size=16, epochs=20, max_steps=120,
        save_steps=4, eval_steps=1000, seed=0,
    )  # fmt: skip
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml())
    state = out / "last" / "trainer_state.json"
    step = lambda: json.loads(state.read_text())["step"] if state.is_file() else 0  # noqa: E731
    before = snapshot(user_dir)

    proc = start("train", "--config", cfg_path, "--quiet", tmp=tmp_path)
    wait_until(lambda: step() >= 4, proc)
    err = kill(proc, signal.SIGTERM)
    assert "--resume" in err
    assert temporaries(out) == []
    killed_at = step()

    proc = start("train", "--config", cfg_path, "--quiet", "--resume", tmp=tmp_path)
    wait_until(lambda: step() > killed_at, proc)
    kill(proc, signal.SIGKILL)

    finish(start("train", "--config", cfg_path, "--quiet", "--resume", tmp=tmp_path))
    assert json.loads((out / "summary.json").read_text())["steps"] == 120
    assert step() == 120
    assert temporaries(out) == []
    kept = {k: v for k, v in snapshot(user_dir).items() if k in before}
    assert kept == before  # the user's files are untouched
    umask = os.umask(0)
    os.umask(umask)
    for name in ("best/model.safetensors", "last/model.safetensors"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name

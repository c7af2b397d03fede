"""Issue 23, defect 19: a SIGKILLed `diffcse-export --quantize int8`, then a rerun without
int8, left the int8 variant's staging folder behind. A rerun removes the dead run's staging
folders of every variant, whether or not it builds that variant itself."""

from __future__ import annotations

import signal

import pytest

from tests.system.test_faults import finish, kill, snapshot, start, temporaries, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_a_rerun_without_int8_removes_the_killed_int8_staging(tiny_bert, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("the user's notes\n")
    out = work / "model"
    args = (tiny_bert, out, "--sts-data", tmp_path / "no-sts", "--quiet")
    before = snapshot(work)

    proc = start("export", *args, "--quantize", "int8", tmp=tmp_path)
    wait_until(lambda: any(f".model-int8.{proc.pid}." in n for n in temporaries(work)), proc)
    kill(proc, signal.SIGKILL)
    assert any(n.startswith(".model-int8.") for n in temporaries(work))

    finish(start("export", *args, tmp=tmp_path))  # no --quantize this time
    assert temporaries(work) == []
    assert sorted(p.name for p in work.iterdir()) == ["model", "notes.txt"]
    assert {k: v for k, v in snapshot(work).items() if not k.startswith("model/")} == before

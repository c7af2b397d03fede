"""diffcse-embed-ray and TextEmbedder on a real local Ray (2 CPUs) with a tiny model.

One Ray per module (starting it costs seconds). Every job runs under an alarm, so a
scheduling hang (an actor pool starving other work) fails the test instead of CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")

from diffcse_runtime import Encoder  # noqa: E402
from diffcse_runtime.errors import DiffcseError  # noqa: E402
from diffcse_runtime.ray_embed import JobSpec, ShardWriter, TextEmbedder, run_job  # noqa: E402
from diffcse_runtime.ray_embed.batch import text_hashes  # noqa: E402
from diffcse_runtime.ray_embed.cli import main as embed_ray  # noqa: E402
from diffcse_runtime.ray_embed.cli import quiet_ray_data, start_local_ray  # noqa: E402
from diffcse_runtime.ray_embed.job import MANIFEST_FILE  # noqa: E402

pytestmark = pytest.mark.slow  # a local Ray cluster per module, Ray jobs and CLI processes

JOB_SECONDS = 60  # one job on 2 CPUs takes ~5-10 s; a hang is caught well before CI's limit


@pytest.fixture(scope="module")
def local_ray():
    temp = tempfile.mkdtemp(prefix="dray-")  # short: Ray's socket paths must stay < 108
    start_local_ray(2, temp_dir=temp)
    quiet_ray_data(False)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def deadline():
    def expire(signum, frame):
        raise TimeoutError(f"Ray job still running after {JOB_SECONDS} s: a scheduling hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(JOB_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return Encoder(tiny_model_dir)


def sentences(n: int, seed: int = 0) -> list[str]:
    from tests.support import tiny

    return tiny.corpus(n, seed=seed)


def read_parts(out) -> pa.Table:
    parts = sorted(p for p in os.listdir(out) if p.startswith("part-"))
    return pa.concat_tables([pq.read_table(os.path.join(out, p)) for p in parts])


def spec_for(model_dir, inputs, **kw) -> JobSpec:
    meta = Encoder(model_dir).meta
    return JobSpec(inputs=[str(i) for i in inputs], model_sha256=meta.onnx_sha256, **kw)


def test_text_embedder_in_map_batches_equals_encoder(
    local_ray, deadline, tiny_model_dir, encoder, tmp_path
):
    """The README's pipeline: read tasks feed a pool of 2 actors at 0.5 CPU each, which
    leaves the read tasks CPUs to run on (a pool holding both CPUs could starve them)."""
    texts = sentences(300)
    pq.write_table(pa.table({"text": texts, "n": list(range(300))}), tmp_path / "docs.parquet")
    ds = ray.data.read_parquet(str(tmp_path / "docs.parquet"))
    out = ds.map_batches(
        TextEmbedder,
        fn_constructor_kwargs={"model_dir": str(tiny_model_dir)},
        batch_size=64,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5,
    ).take_all()
    out.sort(key=lambda row: row["n"])
    assert [row["text"] for row in out] == texts
    got = np.stack([np.asarray(row["embedding"], dtype=np.float32) for row in out])
    np.testing.assert_allclose(got, encoder.encode(texts), atol=1e-5)


def test_job_equals_single_process_encoder_row_for_row(
    local_ray, deadline, tiny_model_dir, encoder, tmp_path
):
    texts = sentences(250)
    src = tmp_path / "in"
    src.mkdir()
    # a text file with an empty line and no final newline, a JSONL file, a Parquet file
    plain = texts[:100]
    plain[7] = ""
    (src / "a.txt").write_text("\n".join(plain), encoding="utf-8")
    rows = [{"text": t, "key": f"k{i}"} for i, t in enumerate(texts[100:180])]
    (src / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.table({"text": texts[180:]}), src / "c.parquet", row_group_size=16)
    out = tmp_path / "out"
    spec = spec_for(tiny_model_dir, [src / "*"], shard_rows=30, keep_text=True)
    result = run_job(spec, tiny_model_dir, str(out), actors=2)
    assert (result.rows_in, result.rows_out, result.shards_skipped) == (250, 250, 0)
    table = read_parts(out)
    expected_texts = plain + texts[100:]
    assert table.column("text").to_pylist() == expected_texts
    ids = table.column("id").to_pylist()
    assert ids[0] == f"{src / 'a.txt'}:1" and ids[99] == f"{src / 'a.txt'}:100"
    assert ids[100] == f"{src / 'b.jsonl'}:1" and ids[249] == f"{src / 'c.parquet'}#69"
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    got = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 32)
    np.testing.assert_allclose(got, encoder.encode(expected_texts), atol=1e-5)
    assert table.column("text_hash").to_pylist() == text_hashes(expected_texts).to_pylist()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["rows_in"] == manifest["rows_out"] == 250
    assert manifest["model"]["onnx_sha256"] == encoder.meta.onnx_sha256


def crash_once_worker(marker: str, shard_index: int) -> type[ShardWriter]:
    """A ShardWriter whose process dies (no cleanup, like an OOM kill) the first time it
    reaches `shard_index`; defined in a function so Ray pickles it by value."""

    class CrashOnce(ShardWriter):
        def write_shard(self, shard):
            if shard.index == shard_index:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
                    os._exit(1)
            return super().write_shard(shard)

    return CrashOnce


def test_killed_actor_job_finishes_with_every_row_once(
    local_ray, deadline, tiny_model_dir, tmp_path
):
    texts = sentences(240, seed=1)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    marker = tmp_path / "crashed"
    spec = spec_for(tiny_model_dir, [src], shard_rows=20)
    worker = crash_once_worker(str(marker), shard_index=3)
    result = run_job(spec, tiny_model_dir, str(tmp_path / "out"), actors=2, worker=worker)
    assert marker.exists()  # an actor really died mid-job
    assert result.rows_out == result.rows_in == 240
    ids = read_parts(tmp_path / "out").column("id").to_pylist()
    assert ids == [f"{src}:{i}" for i in range(1, 241)]  # every row, once, in order


def fail_on_worker(shard_index: int) -> type[ShardWriter]:
    class FailOn(ShardWriter):
        def write_shard(self, shard):
            if shard.index == shard_index:
                raise RuntimeError(f"injected failure on shard {shard_index}")
            return super().write_shard(shard)

    return FailOn


def test_rerun_after_failure_writes_only_missing_parts(
    local_ray, deadline, tiny_model_dir, encoder, tmp_path
):
    texts = sentences(200, seed=2)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    spec = spec_for(tiny_model_dir, [src], shard_rows=25)
    with pytest.raises(Exception, match="injected failure on shard 5"):
        run_job(spec, tiny_model_dir, str(out), actors=1, worker=fail_on_worker(5))
    assert not (out / MANIFEST_FILE).exists()
    before = {p: os.stat(out / p) for p in os.listdir(out) if p.startswith("part-")}
    assert "part-000005.parquet" not in before and len(before) < 8
    result = run_job(spec, tiny_model_dir, str(out), actors=2)
    assert result.shards_skipped == len(before)
    assert sorted(result.written) == sorted(
        {f"part-{i:06d}.parquet" for i in range(8)} - set(before)
    )
    for name, stat in before.items():  # finished parts were not rewritten
        now = os.stat(out / name)
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    table = read_parts(out)
    got = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 32)
    np.testing.assert_allclose(got, encoder.encode(texts), atol=1e-5)
    assert json.loads((out / MANIFEST_FILE).read_text())["rows_out"] == 200
    # a rerun of a finished job writes nothing
    again = run_job(spec, tiny_model_dir, str(out), actors=2)
    assert (again.shards_written, again.rows_out) == (0, 200)


def test_cli_reports_rows_and_refuses_another_job(local_ray, deadline, tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"body": "a man is playing a guitar ."}\n{"body": "two dogs ."}\n')
    out = tmp_path / "out"
    args = [str(src), str(out), "-m", str(tiny_model_dir), "--text-field", "body", "--actors", "1"]
    res = CliRunner().invoke(embed_ray, args)
    assert res.exit_code == 0, res.output
    assert "rows in 2, rows out 2" in res.output
    res = CliRunner().invoke(embed_ray, [*args, "--normalize"])
    assert res.exit_code == 1
    assert f"{out}: holds a different job (changed: normalize)" in res.output


def test_cli_bad_jsonl_line_is_one_sentence(local_ray, deadline, tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n{"txt": "wrong field"}\n')
    res = CliRunner().invoke(embed_ray, [str(src), str(tmp_path / "o"), "-m", str(tiny_model_dir)])
    assert res.exit_code == 1
    assert f"{src}:2: expected a JSON object with a text field 'text'" in res.output
    assert "Traceback" not in res.output


def test_cli_input_matching_nothing_is_one_sentence(local_ray, tiny_model_dir, tmp_path):
    pattern = str(tmp_path / "nothing-*.txt")
    res = CliRunner().invoke(embed_ray, [pattern, str(tmp_path / "o"), "-m", str(tiny_model_dir)])
    assert res.exit_code == 1
    assert f"{pattern}: matches no files" in res.output and "Traceback" not in res.output


def test_cli_unreadable_parquet_is_one_sentence(local_ray, tiny_model_dir, tmp_path):
    src = tmp_path / "broken.parquet"
    src.write_bytes(b"not parquet at all")
    res = CliRunner().invoke(embed_ray, [str(src), str(tmp_path / "o"), "-m", str(tiny_model_dir)])
    assert res.exit_code == 1
    assert f"{src}: not a readable Parquet file" in res.output and "Traceback" not in res.output


def test_cli_without_the_ray_extra_says_what_to_install(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['ray'] = None; "  # as if ray were not installed
        "from diffcse_runtime.ray_embed.cli import main; main()"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, "in.txt", str(tmp_path / "o"), "-m", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert "needs Ray Data and pyarrow" in res.stderr and 'pip install "diffcse[ray]"' in res.stderr
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------- issue 23: 11 and 17


def _assert_rows_match_file(out, src, encoder):
    """Every row of the output is the file's current line, embedded from that text."""
    lines = src.read_text().splitlines()
    table = read_parts(out)
    by_id = dict(zip(table.column("id").to_pylist(), range(table.num_rows), strict=True))
    assert sorted(by_id) == sorted(f"{src}:{i}" for i in range(1, len(lines) + 1))
    order = [by_id[f"{src}:{i}"] for i in range(1, len(lines) + 1)]
    assert [table.column("text")[k].as_py() for k in order] == lines
    got = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 32)
    np.testing.assert_allclose(got[order], encoder.encode(lines), atol=1e-5)


@pytest.mark.slow
def test_rerun_embeds_exactly_the_changed_and_appended_lines(
    local_ray, deadline, tiny_model_dir, encoder, tmp_path
):
    """The issue's reproduction: 300 lines, --shard-rows 100; append 50 lines and rerun
    (was: "rows in 300, rows out 300", the new lines never embedded); then delete one part,
    edit a line it covered and a line of a finished part, and rerun (was: the old text)."""
    src = tmp_path / "a.txt"
    src.write_text("".join(f"{t}\n" for t in sentences(300, seed=5)))
    out = tmp_path / "out"
    args = [str(src), str(out), "-m", str(tiny_model_dir), "--shard-rows", "100"]
    args += ["--actors", "1", "--keep-text"]
    res = CliRunner().invoke(embed_ray, args)
    assert res.exit_code == 0, res.output
    with open(src, "a") as fh:
        fh.write("".join(f"{t} again\n" for t in sentences(50, seed=6)))
    res = CliRunner().invoke(embed_ray, args)
    assert res.exit_code == 0, res.output
    assert "rows in 350, rows out 350; parts written 1, already done 3" in res.output
    assert f"{src}: changed since the last run, part 3 added" in res.output
    _assert_rows_match_file(out, src, encoder)

    lines = src.read_text().splitlines()
    lines[149] = "a freshly edited line in a deleted part ."
    lines[249] = "a freshly edited line in a finished part ."
    src.write_text("".join(f"{t}\n" for t in lines))
    os.unlink(out / "part-000001.parquet")
    kept = os.stat(out / "part-000000.parquet")
    res = CliRunner().invoke(embed_ray, args)
    assert res.exit_code == 0, res.output
    assert f"{src}: changed since the last run, parts 1, 2 redone" in res.output
    assert "parts written 2, already done 2" in res.output
    now = os.stat(out / "part-000000.parquet")
    assert (now.st_ino, now.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    _assert_rows_match_file(out, src, encoder)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["files"][str(src)]["size"] == src.stat().st_size
    assert manifest["files"][str(src)]["mtime_ns"] == src.stat().st_mtime_ns
    assert len({p["input_sha256"] for p in manifest["parts"]}) == 4


def appending_worker(path: str) -> type[ShardWriter]:
    """A ShardWriter that appends a line to the input while the job reads it."""

    class Appender(ShardWriter):
        def write_shard(self, shard):
            if shard.index == 0:
                with open(path, "a") as fh:
                    fh.write("a line written while the job ran .\n")
            return super().write_shard(shard)

    return Appender


@pytest.mark.slow
def test_an_input_changing_while_read_publishes_no_manifest(
    local_ray, deadline, tiny_model_dir, encoder, tmp_path
):
    src = tmp_path / "a.txt"
    src.write_text("".join(f"{t}\n" for t in sentences(60, seed=7)))
    out = tmp_path / "out"
    spec = spec_for(tiny_model_dir, [src], shard_rows=20, keep_text=True)
    with pytest.raises(DiffcseError, match=rf"{src}: changed while the job read it"):
        run_job(spec, tiny_model_dir, str(out), actors=1, worker=appending_worker(str(src)))
    assert not (out / MANIFEST_FILE).exists()
    result = run_job(spec, tiny_model_dir, str(out), actors=1)
    assert result.rows_in == result.rows_out == 61
    assert result.changes == [f"{src}: changed since the last run, part 3 added"]
    _assert_rows_match_file(out, src, encoder)


@pytest.mark.slow
def test_truncated_part_is_redone_and_a_damaged_record_is_one_sentence(
    local_ray, deadline, tiny_model_dir, tmp_path
):
    src = tmp_path / "a.txt"
    src.write_text("".join(f"{t}\n" for t in sentences(40, seed=8)))
    out = tmp_path / "out"
    args = [str(src), str(out), "-m", str(tiny_model_dir), "--shard-rows", "20", "--actors", "1"]
    assert CliRunner().invoke(embed_ray, args).exit_code == 0
    part = out / "part-000001.parquet"
    part.write_bytes(part.read_bytes()[:100])  # a truncated part (a disk that filled up)
    res = CliRunner().invoke(embed_ray, args)
    assert res.exit_code == 0, res.output
    assert f"{part}: unreadable" in res.output and "embedding its rows again" in res.output
    assert "parts written 1, already done 1" in res.output
    assert pq.read_table(part).num_rows == 20
    (out / "_diffcse_job.json").write_text('{"spec": {"inputs": [')
    res = CliRunner().invoke(embed_ray, args)
    assert res.exit_code == 1
    assert f"{out}/_diffcse_job.json: damaged job record (not valid JSON" in res.output
    assert "Traceback" not in res.output and "JSONDecodeError" not in res.output


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (Ray's workers inherit it)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read()
            with open(f"/proc/{pid}/stat") as fh:
                zombie = fh.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if marker.encode() in env and not zombie:
            pids.append(int(pid))
    return pids


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode(errors="replace")
    return ""


def _wait_for_a_part(proc, out, log) -> None:
    import time

    end = time.monotonic() + 300  # Ray's start alone took over 120 s at load 6 on 2 cores
    done = set(os.listdir(out)) if out.is_dir() else set()
    while not (out.is_dir() and any(p.startswith("part-") for p in set(os.listdir(out)) - done)):
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < end, "no part written in 300 s"
        time.sleep(0.05)


def _descendants(root: int) -> set[tuple[int, bytes]]:
    """`root`'s descendants now, as (pid, start time). Taken before a kill: Ray's agents
    retitle themselves, which overwrites the environment /proc shows, so a marker in the
    environment can miss them (it did, and they outlived the job by a minute)."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
            table[int(pid)] = (int(fields[1]), fields[19])
    pids, grew = {root}, True
    while grew:  # down the tree, one generation per pass
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in pids and pid not in pids:
                pids.add(pid)
                grew = True
    return {(pid, table[pid][1]) for pid in pids - {root}}


def _alive(tree: set[tuple[int, bytes]]) -> list[int]:
    """The processes of `tree` still running (same pid and start time, not a zombie)."""
    pids = []
    for pid, start in tree:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
            if fields[19] == start and fields[0] != b"Z":
                pids.append(pid)
    return pids


def _no_processes_left(marker: str, tree: set[tuple[int, bytes]]) -> list[str]:
    """Wait up to 15 s for `marker`'s processes and `tree` to end; kill and return any
    still alive."""
    import time

    def running() -> list[int]:
        return sorted(set(_processes_with(marker)) | set(_alive(tree)))

    end = time.monotonic() + 15  # workers notice their parent's end within seconds
    while running() and time.monotonic() < end:
        time.sleep(0.2)
    left = []
    for pid in running():  # never leave them running past the test
        left.append(_cmdline(pid)[:60])
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.slow
@pytest.mark.faults
def test_killed_job_exits_cleanly_leaves_no_ray_processes_and_resumes(tiny_model_dir, tmp_path):
    """SIGTERM: exit 143 with one sentence (was 15 with Ray's C++ stack lines); SIGKILL:
    no cleanup runs. After either, no Ray process of the job is left, and the next run
    resumes from the finished parts to every row exactly once."""
    import subprocess
    import sys

    src = tmp_path / "a.txt"
    src.write_text("".join(f"{t}\n" for t in sentences(500, seed=9)) * 20)  # 10k lines
    out = tmp_path / "out"
    code = "from diffcse_runtime.ray_embed.cli import main; main()"
    cmd = [sys.executable, "-c", code, str(src), str(out), "-m", str(tiny_model_dir)]
    cmd += ["--shard-rows", "200", "--actors", "1", "--num-cpus", "2"]
    kept = {}
    for sig in (signal.SIGTERM, signal.SIGKILL, None):
        short = tempfile.mkdtemp(prefix="drk-")  # TMPDIR: Ray's session files, our marker
        env = {**os.environ, "TMPDIR": short, "RAY_USAGE_STATS_ENABLED": "0"}
        log = tmp_path / f"log-{sig}"
        tree = set()
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=fh)
            try:
                if sig is not None:
                    _wait_for_a_part(proc, out, log)
                    assert _processes_with(short), "the marker does not find Ray's processes"
                    tree = _descendants(proc.pid)
                    names = " ".join(_cmdline(pid) for pid, _ in tree)
                    assert "raylet" in names and "ray::" in names, names
                    proc.send_signal(sig)
                proc.wait(timeout=180)
            finally:
                if proc.poll() is None:
                    proc.kill()
        text = log.read_text(errors="replace")
        left = _no_processes_left(short, tree)
        shutil.rmtree(short, ignore_errors=True)
        assert left == [], f"alive after the parent exited ({sig}): {left}"
        if sig == signal.SIGTERM:
            assert proc.returncode == 143, text[-3000:]
            assert "interrupted; finished parts are kept, rerun to resume" in text
            assert "Traceback" not in text and "*** " not in text and " @ " not in text, text
        elif sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 0, text[-3000:]
            assert f"already done {len(kept)}" in text
        for name, st in kept.items():  # parts finished before a kill are not redone
            now = os.stat(out / name)
            assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
        kept = {p: os.stat(out / p) for p in os.listdir(out) if p.startswith("part-")}
    ids = read_parts(out).column("id").to_pylist()
    assert ids == [f"{src}:{i}" for i in range(1, 10_001)]  # every row, once, in order

"""Issue 23, defect 1 for diffcse-embed-ray: the job writes into, resumes in or deletes
parts from a folder only when it is new or empty, or when every entry in it is one the
job record lists (the record, manifest.json, the part files and their staging names).

A `_diffcse_job.json` proves nothing by its name: a user's file beside it means refuse,
naming that file. Planning is done in this process (no Ray): the ownership check must come
before any planning, and a finished job's rerun needs no Ray when no part is left to embed.
Also the command's numeric options (issue 23, defect 14): NaN, infinities and out-of-range
values are refused by name before Ray starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("ray")

from diffcse_runtime.model_dir import load_metadata  # noqa: E402
from diffcse_runtime.ownership import NotOursError  # noqa: E402
from diffcse_runtime.ray_embed import job  # noqa: E402
from diffcse_runtime.ray_embed.cli import main as embed_ray  # noqa: E402
from diffcse_runtime.ray_embed.inputs import file_format, plan_file  # noqa: E402
from diffcse_runtime.ray_embed.inputs import resolve as resolve_fs  # noqa: E402
from diffcse_runtime.ray_embed.record import JOB_FILE, Record  # noqa: E402


def local_plan(spec, files):
    """job.plan without Ray: the same plan_file, run in this process."""
    return {
        p: plan_file(resolve_fs(u)[0], p, file_format(p, spec.fmt), spec.shard_rows)
        for p, u in files.items()
    }


def no_planning(spec, files):
    raise AssertionError("the job planned inside a folder that is not its own")


def lines_file(path: Path, n: int) -> Path:
    path.write_text("".join(f"sentence number {i} .\n" for i in range(n)))
    return path


def spec_for(model_dir, inputs, **kw) -> job.JobSpec:
    sha = load_metadata(model_dir).onnx_sha256
    return job.JobSpec(inputs=[str(i) for i in inputs], model_sha256=sha, **kw)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def finished_job(spec: job.JobSpec, model_dir, out: Path, monkeypatch) -> None:
    """A finished output folder made by the job's own code: its record, each part written
    by ShardWriter in this process, then run_job (nothing left to embed) for the manifest."""
    monkeypatch.setattr(job, "plan", local_plan)
    out_fs, out_path = resolve_fs(str(out))
    record, _ = job.load_or_plan(out_fs, out_path, spec)
    writer = job.ShardWriter(str(model_dir), str(out), {**vars(spec), "inputs_fs": record.uris})
    for shard in record.shards:
        writer.write_shard(shard)
    result = job.run_job(spec, model_dir, str(out), actors=1)
    assert result.rows_out == result.rows_in and result.shards_written == 0


def test_a_forged_job_record_beside_a_users_file_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    src = lines_file(tmp_path / "a.txt", 5)
    spec = spec_for(tiny_model_dir, [src])
    out = tmp_path / "p"
    out.mkdir()
    (out / "thesis.tex").write_text("t\n")
    forged = Record(vars(spec), {str(src): str(src)}, {}, [], [0, 1])
    (out / JOB_FILE).write_text(json.dumps(forged.to_json()))
    before = snapshot(out)
    monkeypatch.setattr(job, "plan", no_planning)
    with pytest.raises(NotOursError) as err:
        job.run_job(spec, tiny_model_dir, str(out), actors=1)
    assert f"{out}: holds thesis.tex, which diffcse-embed-ray did not write" in str(err.value)
    assert snapshot(out) == before


def test_a_users_file_in_a_finished_folder_stops_a_rerun_that_retires_parts(
    tiny_model_dir, tmp_path, monkeypatch
):
    src = lines_file(tmp_path / "a.txt", 25)
    spec = spec_for(tiny_model_dir, [src], shard_rows=10)
    out = tmp_path / "out"
    finished_job(spec, tiny_model_dir, out, monkeypatch)
    assert sorted(p for p in os.listdir(out) if p.startswith("part-"))[-1] == "part-000002.parquet"
    (out / "notes.txt").write_text("mine\n")
    lines_file(src, 20)  # the rerun would retire (delete) part 2
    before = snapshot(out)
    with pytest.raises(NotOursError) as err:
        job.run_job(spec, tiny_model_dir, str(out), actors=1)
    assert "holds notes.txt, which diffcse-embed-ray did not write" in str(err.value)
    assert snapshot(out) == before


@pytest.mark.parametrize("kind", ["symlink", "dir"])
def test_a_listed_part_name_that_is_not_a_regular_file_is_foreign(
    tiny_model_dir, tmp_path, monkeypatch, kind
):
    """A retired part's name held by a link or a folder is the user's: never deleted."""
    src = lines_file(tmp_path / "a.txt", 25)
    spec = spec_for(tiny_model_dir, [src], shard_rows=10)
    out = tmp_path / "out"
    finished_job(spec, tiny_model_dir, out, monkeypatch)
    part = out / "part-000002.parquet"
    part.unlink()
    target = tmp_path / "precious.txt"
    target.write_text("keep\n")
    part.symlink_to(target) if kind == "symlink" else part.mkdir()
    lines_file(src, 20)
    with pytest.raises(NotOursError, match="holds part-000002.parquet"):
        job.run_job(spec, tiny_model_dir, str(out), actors=1)
    assert os.path.lexists(part) and target.read_text() == "keep\n"


def test_our_own_rerun_still_retires_parts_and_accepts_staging_leftovers(
    tiny_model_dir, tmp_path, monkeypatch
):
    src = lines_file(tmp_path / "a.txt", 25)
    spec = spec_for(tiny_model_dir, [src], shard_rows=10)
    out = tmp_path / "out"
    finished_job(spec, tiny_model_dir, out, monkeypatch)
    # what a SIGKILL mid-write leaves: atomic_file's staging names of a part and the record
    (out / ".part-000001.parquet.999999.abc_12xy.tmp").write_bytes(b"half")
    (out / f".{JOB_FILE}.999999.k3j_9zzq.tmp").write_bytes(b"{")
    lines_file(src, 20)
    result = job.run_job(spec, tiny_model_dir, str(out), actors=1)
    assert (result.rows_in, result.rows_out, result.shards_written) == (20, 20, 0)
    assert not (out / "part-000002.parquet").exists()  # retired: listed, regular, ours
    assert any("part 2 removed" in note for note in result.changes)


def test_a_part_file_without_a_job_record_is_not_ours(tiny_model_dir, tmp_path, monkeypatch):
    src = lines_file(tmp_path / "a.txt", 5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-000000.parquet").write_bytes(b"someone else's")
    monkeypatch.setattr(job, "plan", no_planning)
    with pytest.raises(NotOursError, match="holds part-000000.parquet"):
        job.run_job(spec_for(tiny_model_dir, [src]), tiny_model_dir, str(out), actors=1)


def test_the_working_directory_is_never_the_output(tiny_model_dir, tmp_path, monkeypatch):
    src = lines_file(tmp_path / "a.txt", 5)
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setattr(job, "plan", no_planning)
    spec = spec_for(tiny_model_dir, [src])
    for out in (".", str(tmp_path)):  # the working directory, and a folder holding it
        with pytest.raises(NotOursError, match="current working directory"):
            job.run_job(spec, tiny_model_dir, out, actors=1)
    assert os.listdir(here) == []


def test_a_folder_holding_an_input_is_never_the_output(tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    src = lines_file(data / "a.txt", 5)
    monkeypatch.setattr(job, "plan", no_planning)
    with pytest.raises(NotOursError, match=f"{data}: is or holds the input"):
        job.run_job(spec_for(tiny_model_dir, [src]), tiny_model_dir, str(data), actors=1)
    assert os.listdir(data) == ["a.txt"]


def test_cli_refuses_a_folder_not_its_own_before_starting_ray(tiny_model_dir, tmp_path):
    src = lines_file(tmp_path / "a.txt", 5)
    out = tmp_path / "p"
    out.mkdir()
    (out / JOB_FILE).write_text("{}")
    (out / "a.js").write_text("c\n")
    args = [str(src), str(out), "-m", str(tiny_model_dir), "--num-cpus", "1"]
    res = CliRunner().invoke(embed_ray, args)
    assert res.exit_code == 1, res.output
    assert "holds a.js, which diffcse-embed-ray did not write" in res.output
    assert "Traceback" not in res.output
    import ray

    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "option, value",
    [
        ("--num-cpus", "0"),
        ("--num-cpus", "-2"),
        ("--num-cpus", "nan"),
        ("--num-cpus", "inf"),
        ("--actors", "0"),
        ("--threads", "0"),
        ("--threads", "1e9"),
        ("--shard-rows", "-1"),
        ("--batch-size", "0"),
        ("--batch-size", "nan"),
    ],
)
def test_numeric_options_refuse_bad_values_by_name(tiny_model_dir, tmp_path, option, value):
    src = lines_file(tmp_path / "a.txt", 2)
    args = [str(src), str(tmp_path / "o"), "-m", str(tiny_model_dir), option, value]
    res = CliRunner().invoke(embed_ray, args)
    assert res.exit_code == 2, res.output
    assert option in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()

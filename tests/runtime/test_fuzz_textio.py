"""Property-based fuzz (issue 12): the text readers and `Encoder.encode` over arbitrary bytes
and str give a result or one of their documented errors, never a traceback."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffcse_runtime import Encoder
from diffcse_runtime.cli import embed
from diffcse_runtime.errors import DataFormatError
from diffcse_runtime.inputs import TextValueError
from diffcse_runtime.retrieval import _read_texts
from diffcse_runtime.sts import load_task
from diffcse_runtime.textio import iter_lines

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Lines that look like real data often enough to get past the first check.
LINEISH = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.just(b"main\tx\t2012\t0001\t3.5\ta cat\ta dog"),
        st.just(b"main\tx\t2012\t0001\tnan\ta cat\ta dog"),
        st.just(b'"a text"'),
    ),
    max_size=8,
).map(lambda lines: b"\n".join(lines))


def n_lines(data: bytes) -> int:
    """Lines end at b"\n" only (a lone \r stays inside its text); a last line may lack one."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=60)


@FUZZ
@given(data=LINEISH, errors=st.sampled_from(["strict", "replace"]))
def test_iter_lines_yields_every_line_or_names_the_bad_one(data, errors):
    expected = n_lines(data)
    src = io.BytesIO(data)
    src.name = "input.txt"
    try:
        lines = list(iter_lines(src, errors))
    except DataFormatError as exc:
        assert errors == "strict"
        assert str(exc).startswith("input.txt:") and "not valid UTF-8" in str(exc)
        return
    assert [n for n, _ in lines] == list(range(1, expected + 1))
    assert all(isinstance(t, str) and "\n" not in t for _, t in lines)


@FUZZ
@given(data=LINEISH)
def test_sts_reader_loads_or_names_file_and_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        task = Path(tmp) / "STSBenchmark"
        task.mkdir()
        (task / "sts-dev.csv").write_bytes(data)
        try:
            pairs = load_task(tmp, "STSBenchmark", "dev")
        except DataFormatError as exc:
            assert "sts-dev.csv:" in str(exc), str(exc)
            return
        assert np.isfinite(pairs.gold).all()
        assert len(pairs.sents1) == len(pairs.sents2) == len(pairs.gold)


@FUZZ
@given(data=LINEISH)
def test_index_texts_reader_loads_or_names_file_and_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "texts.jsonl"
        path.write_bytes(data)
        try:
            texts = _read_texts(path)
        except DataFormatError as exc:
            assert str(exc).startswith(f"{path}:"), str(exc)
            return
        assert all(isinstance(t, str) for t in texts)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return Encoder(tiny_model_dir)


@settings(max_examples=40, deadline=None)
@given(texts=st.one_of(ANY_TEXT, st.lists(ANY_TEXT, min_size=1, max_size=6)))
def test_encode_any_str_gives_finite_rows(encoder, texts):
    """Finite rows for any valid text; a lone surrogate (not valid Unicode) is refused by a
    sentence naming the first such text, never a TypeError from the tokenizer."""
    listed = [texts] if isinstance(texts, str) else texts
    bad = [i for i, t in enumerate(listed) if any(0xD800 <= ord(c) <= 0xDFFF for c in t)]
    if bad:
        with pytest.raises(TextValueError, match=rf"texts\[{bad[0]}\] holds a lone surrogate"):
            encoder.encode(texts)
        return
    out = encoder.encode(texts)
    rows = 1 if isinstance(texts, str) else len(texts)
    assert out.reshape(rows, -1).shape == (rows, encoder.embedding_dim)
    assert np.isfinite(out).all()


NOT_TEXT = st.one_of(
    st.binary(max_size=20),
    st.lists(st.binary(max_size=10), min_size=1, max_size=3),
    st.lists(st.one_of(st.integers(), st.none(), st.floats(), st.binary()), min_size=1),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), min_size=1, max_size=3),
    st.sets(st.text(max_size=5), min_size=1, max_size=3),
    st.integers(),
)


@settings(max_examples=40, deadline=None)
@given(value=NOT_TEXT)
def test_encode_refuses_what_is_not_text_with_a_type_error(encoder, value):
    with pytest.raises(TypeError) as info:
        encoder.encode(value)
    assert "str" in str(info.value) or "text" in str(info.value)


@settings(max_examples=15, deadline=None)
@given(data=LINEISH)
def test_embed_cli_on_any_file_is_rows_or_one_sentence(tiny_model_dir, data):
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.txt", Path(tmp) / "out.npy"
        src.write_bytes(data)
        res = CliRunner().invoke(embed, [str(src), "-m", str(tiny_model_dir), "-o", str(out)])
        if res.exit_code == 0:
            assert np.load(out).shape[0] == n_lines(data)
            return
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), repr(res.exception)
        assert res.output.strip().splitlines()[-1].startswith(f"Error: {src}:")
        assert not out.exists()

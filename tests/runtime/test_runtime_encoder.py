"""Encoder: parity with PyTorch, order, batching, edge cases, and the model-dir checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffcse_runtime import Encoder, ModelDirError, similarity
from diffcse_runtime.model_dir import FORMAT_VERSION, METADATA_FILE, load_metadata, write_metadata
from tests.support import tiny

TEXTS = tiny.corpus(40) + [
    "",
    "x",
    "a much longer sentence about the red car " * 12,
    "café ñ 漢字 🙂",
]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return Encoder(tiny_model_dir)


def torch_cls(hf_dir, texts, max_len=128):
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    batch = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state[:, 0].numpy()


def test_matches_pytorch_cls(encoder, tiny_bert):
    ours = encoder.encode(TEXTS, batch_size=8)
    ref = torch_cls(tiny_bert, TEXTS)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_order_restored_and_batch_size_invariant(encoder):
    full = encoder.encode(TEXTS, batch_size=64)
    rev = encoder.encode(TEXTS[::-1], batch_size=3)
    np.testing.assert_allclose(rev[::-1], full, atol=1e-5)
    for i, text in enumerate(TEXTS[:5]):
        np.testing.assert_allclose(encoder.encode(text), full[i], atol=1e-5)


def test_single_string_empty_list_and_empty_string(encoder):
    assert encoder.encode("hello").shape == (32,)
    assert encoder.encode([]).shape == (0, 32)
    out = encoder.encode(["a man", "", "a dog"])
    assert out.shape == (3, 32)
    np.testing.assert_allclose(out[1], encoder.encode(""), atol=1e-5)
    assert not np.allclose(out[0], out[1])


def test_non_string_named_by_index(encoder):
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        encoder.encode(["a", "b", 3])


def test_a_lone_surrogate_is_named_by_index(encoder):
    """Issue 23 defect 19: the tokenizer's TypeError named no text; one sentence names it."""
    with pytest.raises(ValueError, match=r"texts\[1\] holds a lone surrogate \(U\+D800 at "):
        encoder.encode(["fine", "ab\ud800c"])
    with pytest.raises(ValueError, match=r"texts\[0\] holds a lone surrogate \(U\+DFFF"):
        encoder.encode("\udfff")
    with pytest.raises(ValueError, match=r"texts\[2\] holds a lone surrogate"):
        list(encoder.embed(iter(["a", "b", "x\udc80"]), chunk_size=2))
    with pytest.raises(ValueError, match=r"texts\[1\] holds a lone surrogate"):
        encoder.tokenize(["a", "\ud800"])  # the server's path
    assert encoder.encode(["😀 \U0001f600"]).shape == (1, 32)  # real astral characters pass


def test_truncates_to_max_length(tiny_bert, tiny_model_dir, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(tiny_model_dir, short)
    meta = load_metadata(short, verify_hash=False)
    meta.max_seq_length = 6
    write_metadata(short, meta)  # a deliberate edit re-records the metadata's hash
    long = ["a man is playing a guitar in the park today with a friend"]
    np.testing.assert_allclose(
        Encoder(short).encode(long), torch_cls(tiny_bert, long, 6), atol=1e-5
    )


def test_normalize_and_similarity(encoder):
    emb = encoder.encode(TEXTS[:4], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    alias = encoder.encode(TEXTS[:4], normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(alias, emb, atol=1e-6)
    sims = encoder.similarity(emb, emb)
    assert sims.shape == (4, 4)
    np.testing.assert_allclose(np.diag(sims), 1.0, atol=1e-5)
    assert similarity(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(0.0)
    assert similarity(np.array([1.0, 1.0]), np.array([2.0, 2.0])) == pytest.approx(1.0)
    assert encoder.get_sentence_embedding_dimension() == 32


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.text(max_size=80), max_size=6))
def test_fuzz_any_unicode_encodes(encoder, texts):
    out = encoder.encode(texts, batch_size=4)
    assert out.shape == (len(texts), 32) and np.isfinite(out).all()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_refuses_missing_file(tiny_model_dir, tmp_path):
    bad = _copy(tiny_model_dir, tmp_path / "m")
    (bad / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match="missing tokenizer.json"):
        Encoder(bad)
    with pytest.raises(ModelDirError, match="no such folder"):
        Encoder(tmp_path / "nope")


def test_refuses_newer_format(tiny_model_dir, tmp_path):
    bad = _copy(tiny_model_dir, tmp_path / "m")
    meta = json.loads((bad / METADATA_FILE).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (bad / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="newer than this runtime"):
        load_metadata(bad)


def test_refuses_changed_model(tiny_model_dir, tmp_path):
    bad = _copy(tiny_model_dir, tmp_path / "m")
    with open(bad / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelDirError, match="does not match"):
        Encoder(bad)


def test_refuses_broken_metadata(tiny_model_dir, tmp_path):
    bad = _copy(tiny_model_dir, tmp_path / "m")
    (bad / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        Encoder(bad)
    (bad / METADATA_FILE).write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ModelDirError, match="missing key"):
        Encoder(bad)


def test_explicit_provider_and_threads(tiny_model_dir):
    enc = Encoder(tiny_model_dir, providers=["CPUExecutionProvider"], intra_op_threads=1)
    assert enc.session.get_providers() == ["CPUExecutionProvider"]

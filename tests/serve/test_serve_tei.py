"""diffcse-serve's text-embeddings-inference routes against the real `tei-client` package.

Every server is uvicorn in a thread on 127.0.0.1 serving the tiny exported model; each test
sends a bounded number of requests. Embeddings are compared with `Encoder.encode` of the
same texts, tokens with the model's own tokenizer.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
tei_client = pytest.importorskip("tei_client")

from tokenizers import Tokenizer  # noqa: E402

from diffcse_runtime import Encoder  # noqa: E402
from diffcse_runtime.conventions import truncate_dims  # noqa: E402
from diffcse_runtime.serve import BatchSettings, ServeSettings  # noqa: E402
from tests.support.serve_helpers import SHORT, TOO_LONG, assert_same_rows, metric, thread_server  # noqa: E402

KEY = "tei-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def offline(tiny_model_dir) -> Encoder:
    return Encoder(tiny_model_dir, intra_op_threads=1)


@pytest.fixture(scope="module")
def url(offline):
    settings = ServeSettings(api_keys=(KEY,), max_inputs=16, batch=BatchSettings(max_queue=64))
    with thread_server({"tiny": offline}, settings) as base:
        yield base


def client(base: str) -> tei_client.HttpClient:
    return tei_client.HttpClient(base, headers=AUTH, timeout=30)


def tei_error(r: httpx.Response, status: int, kind: str) -> str:
    """The message of a TEI error body, after checking its status and error_type."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == kind, body
    return body["error"]


def post(base: str, path: str, body, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=30)


# ------------------------------------------------------------------ the tei-client package


def test_info_is_what_tei_client_reads(url, offline):
    info = client(url).info()  # KeyError 'model_type' before the TEI routes
    assert info.server_model_type == tei_client.ModelType.Embedding
    assert info.server_model_metadata.pooling == offline.meta.pooling
    assert info.server_model_id == "tiny"
    assert info.server_model_sha == offline.meta.onnx_sha256
    assert info.max_input_length == offline.max_seq_length == 128
    assert info.max_client_batch_size == 16
    assert client(url).health()


def test_embed_matches_the_offline_encoder(url, offline):
    texts = SHORT[:5] + ["café ñ 漢字 🙂"]
    tei = client(url)
    assert_same_rows(np.array(tei.embed(texts)), offline.encode(texts, normalize=True))
    raw = tei.embed(texts, normalize=False)  # the raw model output, as TEI gives it
    assert_same_rows(np.array(raw), offline.encode(texts))
    one = tei.embed("the cat sleeps")  # a single string: one row
    assert_same_rows(np.array(one), offline.encode(["the cat sleeps"], normalize=True))
    rows = asyncio.run(tei.async_embed(texts[:2]))
    assert_same_rows(np.array(rows), offline.encode(texts[:2], normalize=True))


def test_tokenize_and_decode_use_the_models_tokenizer(url, offline):
    texts = ["a dog runs in the park", "café ñ"]
    results = client(url).tokenize(texts)
    full = Tokenizer.from_str(offline.tokenizer.to_str())
    full.no_truncation()
    for text, result in zip(texts, results, strict=True):
        want = full.encode(text)
        assert result.get_ids() == want.ids
        assert [t.special for t in result.tokens] == [bool(m) for m in want.special_tokens_mask]
        for token in result.tokens:
            if token.special:
                assert token.start is None and token.text in ("[CLS]", "[SEP]")
            else:  # TEI's offsets count UTF-8 bytes
                assert text.encode()[token.start : token.stop].decode() == token.text
    long = client(url).tokenize(TOO_LONG)[0].tokens  # every token, not cut at the limit
    assert len(long) == len(full.encode(TOO_LONG).ids) > offline.max_seq_length
    big = "word " * 4000  # over INLINE_CHARS: tokenized off the event loop
    assert len(client(url).tokenize(big)[0].tokens) == len(full.encode(big).ids)
    over = ["x" * (2**17 + 1)] * 2  # more characters than one /tokenize call takes
    err = tei_error(post(url, "/tokenize", {"inputs": over}), 413, "validation")
    assert err.startswith("inputs hold 262146 characters, over the 262144 this server")
    ids = results[0].get_ids()
    assert client(url).decode(ids) == [full.decode(ids)]
    assert client(url).decode([ids, ids[:3]], skip_special_tokens=False)[1].startswith("[CLS]")


def test_token_ids_are_embedded_as_their_text(url, offline):
    """TEI's `inputs` may hold the model's own token ids (from /tokenize)."""
    ids = client(url).tokenize("a dog runs")[0].get_ids()
    rows = client(url).embed([ids, "a dog runs"])
    assert_same_rows(np.array(rows), offline.encode(["a dog runs"] * 2, normalize=True))
    err = tei_error(post(url, "/embed", {"inputs": [[1, 10**9]]}), 400, "validation")
    assert "inputs[0][1] must be a token id" in err


def test_dimensions_cut_then_renormalise(url, offline):
    texts = SHORT[:4]
    raw = offline.encode(texts)
    r = post(url, "/embed", {"inputs": texts, "dimensions": 16})
    assert_same_rows(np.array(r.json()), truncate_dims(raw, 16, normalize=True))
    assert np.allclose(np.linalg.norm(np.array(r.json()), axis=1), 1, atol=1e-6)
    r = post(url, "/embed", {"inputs": texts, "dimensions": 16, "normalize": False})
    assert_same_rows(np.array(r.json()), raw[:, :16])
    for bad in (0, offline.embedding_dim + 1):
        r = post(url, "/embed", {"inputs": texts, "dimensions": bad})
        assert "dimensions must be between 1 and" in tei_error(r, 400, "validation")


def test_truncation_follows_the_request(url, offline):
    err = tei_error(post(url, "/embed", {"inputs": ["ok", TOO_LONG]}), 413, "validation")
    assert err.startswith("inputs[1] has ") and '"truncate": true' in err
    r = post(url, "/embed", {"inputs": ["ok", TOO_LONG], "truncate": True})
    assert r.headers["X-Diffcse-Truncated"] == "1"
    assert_same_rows(np.array(r.json()), offline.encode(["ok", TOO_LONG], normalize=True))
    left = {"inputs": TOO_LONG, "truncate": True, "truncation_direction": "Left"}
    err = tei_error(post(url, "/embed", left), 413, "validation")  # refused, not faked
    assert err.startswith("inputs has ") and 'truncation_direction "Left"' in err
    rows = client(url).embed(
        "short", truncation_direction=tei_client.models.TruncationDirection.Left
    )
    assert_same_rows(np.array(rows), offline.encode(["short"], normalize=True))  # nothing cut


def test_embed_all_says_what_the_model_lacks_and_prompts_are_listed(url, offline):
    r = post(url, "/embed_all", {"inputs": "hi"})
    assert "pooled sentence_embedding output only" in tei_error(r, 424, "backend")
    # sentence-transformers' prompts: every model has "query" and "document" ("" unless set)
    assert client(url).prompt_names() == list(offline.prompts) == ["query", "document"]
    r = post(url, "/embed", {"inputs": "hi", "prompt_name": "nope"})
    assert 'Available prompts: ["query", "document"]' in tei_error(r, 400, "validation")


# ------------------------------------------------------------------ shared limits and errors


def test_refusals_use_teis_error_body(url):
    assert "missing API key" in tei_error(
        post(url, "/embed", {"inputs": "x"}, {}), 401, "unauthorized"
    )
    r = httpx.get(f"{url}/info", headers={"Authorization": "Bearer wrong"})
    assert tei_error(r, 401, "unauthorized") == "the API key is not valid"
    assert tei_error(post(url, "/embed", {"inputs": []}), 400, "empty").startswith(
        "inputs is empty"
    )
    err = tei_error(post(url, "/embed", {"inputs": ["a", ""]}), 400, "validation")
    assert err == "inputs[1] is an empty string"
    err = tei_error(post(url, "/embed", {"inputs": ["x"] * 17}), 413, "validation")
    assert "over this server's limit of 16" in err
    err = tei_error(post(url, "/embed", {"inputs": {"a": 1}}), 422, "validation")
    assert err.startswith("inputs must be a string")
    body = {"inputs": "x", "encoding_format": "base64"}  # not ignored: /embed answers floats
    assert "encoding_format" in tei_error(post(url, "/embed", body), 422, "validation")
    err = tei_error(post(url, "/embed", {"inputs": "x", "normalize": "yes"}), 422, "validation")
    assert err.startswith("normalize:")
    json_type = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(f"{url}/tokenize", content=b"{nope", headers=json_type)
    assert tei_error(r, 422, "validation") == "the request body is not valid JSON"


def test_a_full_queue_is_teis_429(tiny_model_dir, offline):
    settings = ServeSettings(batch=BatchSettings(max_queue=1), retry_after_s=2)
    with thread_server({"tiny": offline}, settings) as base:
        r = post(base, "/embed", {"inputs": ["a", "b"]}, {})
        assert "queue of model 'tiny' is full" in tei_error(r, 429, "overloaded")
        assert r.headers["Retry-After"] == "2"
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, 'diffcse_queue_rejected_total{model="tiny"}') == 1


def test_each_model_has_its_own_base_url(offline):
    """TEI serves one model: with several, each is at /tei/NAME, and the root names them."""
    with thread_server({"tiny": offline, "tiny-b": offline}, ServeSettings()) as base:
        r = httpx.get(f"{base}/info")
        assert "/tei/tiny, /tei/tiny-b" in tei_error(r, 400, "validation")
        tei = tei_client.HttpClient(f"{base}/tei/tiny-b", timeout=30)
        assert tei.info().server_model_id == "tiny-b"
        rows = tei.embed(SHORT[:2])
        assert_same_rows(np.array(rows), offline.encode(SHORT[:2], normalize=True))
        text = httpx.get(f"{base}/metrics").text  # the shared counters saw the TEI request
        assert metric(text, 'diffcse_inputs_total{model="tiny-b"}') == 2
        assert metric(text, 'diffcse_requests_total{path="/tei/tiny-b/embed",status="200"}') == 1


def test_huggingface_hub_inference_client(url, offline):
    """huggingface_hub's InferenceClient on a TEI URL posts to / and /similarity."""
    hub = pytest.importorskip("huggingface_hub")
    inference = hub.InferenceClient(model=url, token=KEY, timeout=30)
    rows = inference.feature_extraction("a dog runs in the park")
    assert_same_rows(rows, offline.encode(["a dog runs in the park"], normalize=True))
    others = SHORT[:3]
    got = inference.sentence_similarity("a dog runs", other_sentences=others)
    want = offline.similarity(offline.encode("a dog runs"), offline.encode(others))[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    r = post(url, "/similarity", {"inputs": {"source_sentence": "x", "sentences": []}})
    assert tei_error(r, 400, "empty") == "inputs.sentences is an empty list"

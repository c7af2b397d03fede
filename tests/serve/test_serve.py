"""diffcse-serve against the real `openai` client and httpx, on live loopback servers.

Every server here is uvicorn in a thread on 127.0.0.1 with the tiny exported model; each
test sends a bounded number of requests. Served rows are compared with `Encoder.encode` of
exactly the same texts.
"""

from __future__ import annotations

import base64
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from diffcse_runtime import Encoder  # noqa: E402
from diffcse_runtime.serve import BatchSettings, ServeSettings  # noqa: E402
from tests.support.serve_helpers import (  # noqa: E402
    LONG,
    SHORT,
    TOO_LONG,
    assert_same_rows,
    metric,
    thread_server,
)

KEY = "test-key-0123"


@pytest.fixture(scope="module")
def offline(tiny_model_dir) -> Encoder:
    return Encoder(tiny_model_dir, intra_op_threads=1)


@pytest.fixture(scope="module")
def served(tiny_model_dir) -> Encoder:
    return Encoder(tiny_model_dir, intra_op_threads=1)


@pytest.fixture(scope="module")
def url(served):
    """Two names for the tiny model, an API key, small limits."""
    settings = ServeSettings(
        api_keys=(KEY,), max_inputs=64, max_body_bytes=64_000, batch=BatchSettings(max_queue=4096)
    )
    with thread_server({"tiny": served, "tiny-b": served}, settings) as base:
        yield base


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


def want(offline: Encoder, texts: list[str]) -> np.ndarray:
    return offline.encode(texts, normalize=True)


def post(base: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/v1/embeddings", json=body, headers=headers, timeout=30, **kwargs)


# ------------------------------------------------------------------ the OpenAI client


@pytest.mark.parametrize("encoding", ["float", "base64", None])
def test_openai_client_gets_the_offline_embeddings(url, offline, encoding):
    texts = SHORT[:5] + LONG[:2] + ["café ñ 漢字 🙂"]
    kwargs = {"encoding_format": encoding} if encoding else {}  # None: the client's default
    result = client(url).embeddings.create(input=texts, model="tiny", **kwargs)
    assert [d.index for d in result.data] == list(range(len(texts)))
    if encoding == "base64":  # asked for explicitly, the client hands the strings back
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in result.data])
    else:  # float, or the client's default: base64 on the wire, decoded by the client
        got = np.array([d.embedding for d in result.data])
    assert_same_rows(got, want(offline, texts))
    tokens = sum(len(e.ids) for e in offline.tokenizer.encode_batch(texts))
    assert result.usage.prompt_tokens == result.usage.total_tokens == tokens
    assert result.model == "tiny"


def test_base64_is_little_endian_float32(url, offline):
    r = post(url, {"input": "a dog runs", "model": "tiny-b", "encoding_format": "base64"})
    assert r.status_code == 200
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    got = np.frombuffer(raw, dtype="<f4")
    assert_same_rows(got[None], want(offline, ["a dog runs"]))
    assert "truncated" not in r.json()


def test_single_string_and_models_health_ready(url, offline):
    emb = client(url).embeddings.create(input="the cat sleeps", model="tiny-b").data
    assert len(emb) == 1
    assert_same_rows(np.array([emb[0].embedding]), want(offline, ["the cat sleeps"]))
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny-b"]
    assert models.data[0].model_extra["embedding_dim"] == offline.embedding_dim
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").json()["models"] == ["tiny", "tiny-b"]


# ------------------------------------------------------------------ dynamic batching


def test_32_concurrent_clients_each_get_exactly_their_rows(url, offline):
    rng = random.Random(13)
    requests = []
    for _ in range(32):
        n = rng.choice([1, 1, 2, 5, 17, 64])
        requests.append(
            [rng.choice(SHORT) if rng.random() < 0.7 else rng.choice(LONG) for _ in range(n)]
        )
    before = httpx.get(f"{url}/metrics").text
    start = threading.Barrier(32)

    def send(texts: list[str]) -> np.ndarray:
        c = client(url)
        start.wait()
        result = c.embeddings.create(input=texts, model="tiny", encoding_format="float")
        return np.array([d.embedding for d in result.data])

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(send, requests))
    for texts, got in zip(requests, results, strict=True):
        assert_same_rows(got, want(offline, texts))
    after = httpx.get(f"{url}/metrics").text
    runs = 'diffcse_batch_requests_count{model="tiny"}'
    alone = 'diffcse_batch_requests_bucket{le="1.0",model="tiny"}'
    merged = (metric(after, runs) - metric(before, runs)) - (
        metric(after, alone) - metric(before, alone)
    )
    assert merged >= 1, "no session run served more than one request"
    timed = 'diffcse_batch_duration_seconds_count{model="tiny"}'
    assert metric(after, timed) == metric(after, runs)  # every run timed
    assert metric(after, 'diffcse_inputs_total{model="tiny"}') >= sum(map(len, requests))


def test_a_huge_request_does_not_starve_small_ones(served, offline):
    settings = ServeSettings(max_inputs=2048, batch=BatchSettings(max_batch_tokens=256))
    huge = [LONG[i % len(LONG)] for i in range(2048)]
    with thread_server({"tiny": served}, settings) as base, ThreadPoolExecutor(1) as pool:
        big = pool.submit(post, base, {"input": huge}, None)
        deadline = time.monotonic() + 10
        while metric(httpx.get(f"{base}/metrics").text, "diffcse_requests_in_flight") < 1:
            assert time.monotonic() < deadline and not big.done()
            time.sleep(0.005)
        small = post(base, {"input": SHORT[:3]}, None)
        assert small.status_code == 200
        assert not big.done(), "the small request waited for the whole huge one"
        assert_same_rows(
            np.array([d["embedding"] for d in small.json()["data"]]), want(offline, SHORT[:3])
        )
        assert big.result().status_code == 200


# ------------------------------------------------------------------ errors


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_400_names_the_field(url, offline):
    assert error_of(post(url, {"input": [], "model": "tiny"}), 400)["param"] == "input"
    assert (
        error_of(post(url, {"input": "", "model": "tiny"}), 400)["message"]
        == "input is an empty string"
    )
    err = error_of(post(url, {"input": ["a", "b", 7], "model": "tiny"}), 400)
    assert err["param"] == "input[2]" and "input[2]" in err["message"]
    err = error_of(post(url, {"input": ["ok", TOO_LONG], "model": "tiny"}), 400)
    full = len(offline.tokenizer.encode(TOO_LONG).ids)  # truncated at 128 by the encoder
    assert full == 128
    assert err["param"] == "input[1]" and err["code"] == "context_length_exceeded"
    assert "tokens, over the limit of 128" in err["message"]
    count = err["message"].split(" has ")[1].removeprefix("at least ").split()[0]
    assert int(count) > 128  # a lower bound for a text longer than the tokenizing window
    wide = offline.embedding_dim + 1  # 1..embedding_dim are honoured (test_serve_clients)
    err = error_of(post(url, {"input": "x", "model": "tiny", "dimensions": wide}), 400)
    assert err["param"] == "dimensions"
    assert post(
        url, {"input": "x", "dimensions": offline.embedding_dim, "model": "tiny"}
    ).is_success
    assert error_of(post(url, {"input": "x"}), 400)["param"] == "model"  # two models served
    assert error_of(post(url, {"input": "x", "model": "tiny", "encoding_format": "hex"}), 400)[
        "param"
    ] == ("encoding_format")
    json_type = {"Content-Type": "application/json"}
    r = httpx.post(
        f"{url}/v1/embeddings",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", **json_type},
    )
    assert "not valid JSON" in error_of(r, 400)["message"]
    with pytest.raises(openai.BadRequestError, match=r"input\[1\]"):
        client(url).embeddings.create(input=["a", ""], model="tiny")


def test_401_without_or_with_a_wrong_key(url):
    assert error_of(post(url, {"input": "x", "model": "tiny"}, key=None), 401)["code"] == (
        "invalid_api_key"
    )
    error_of(post(url, {"input": "x", "model": "tiny"}, key=KEY + "x"), 401)
    error_of(post(url, {"input": "x", "model": "tiny"}, key=KEY[:-1]), 401)
    assert httpx.get(f"{url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").embeddings.create(input="x", model="tiny")
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_404_unknown_model_and_path(url):
    err = error_of(post(url, {"input": "x", "model": "gpt-9"}), 404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    with pytest.raises(openai.NotFoundError):
        client(url).embeddings.create(input="x", model="gpt-9")
    error_of(httpx.get(f"{url}/v2/nothing"), 404)


def test_413_body_or_input_count_too_large(url):
    err = error_of(post(url, {"input": ["x"] * 65, "model": "tiny"}), 413)
    assert err["param"] == "input" and "65" in err["message"]
    big = {"input": ["word " * 500] * 40, "model": "tiny"}  # ~100 kB > 64 kB
    assert "64000 bytes" in error_of(post(url, big), 413)["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "input": ["'
        for _ in range(100):
            yield b"word " * 200
        yield b'"]}'

    r = httpx.post(
        f"{url}/v1/embeddings",
        content=chunks(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    error_of(r, 413)


def test_503_when_the_queue_is_full(served, offline):
    """A worker that waits 1 s for its batch to fill holds the first request in the queue;
    the queue holds 16 texts, so every other concurrent request is refused, not stored."""
    batch = BatchSettings(max_queue=16, max_wait_s=1.0, max_batch_tokens=100_000)
    settings = ServeSettings(max_inputs=16, batch=batch, retry_after_s=2)
    texts = LONG[:16]
    with thread_server({"tiny": served}, settings) as base, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(base, {"input": texts}, None), range(8)))
        metrics = httpx.get(f"{base}/metrics").text
    ok = [r for r in responses if r.status_code == 200]
    full = [r for r in responses if r.status_code == 503]
    assert len(ok) + len(full) == 8 and ok and full
    for r in full:
        assert r.headers["Retry-After"] == "2"
        assert error_of(r, 503)["code"] == "queue_full"
    for r in ok:
        assert_same_rows(np.array([d["embedding"] for d in r.json()["data"]]), want(offline, texts))
    assert metric(metrics, 'diffcse_queue_rejected_total{model="tiny"}') == len(full)
    assert metric(metrics, 'diffcse_requests_total{path="/v1/embeddings",status="503"}') == len(
        full
    )


def test_truncate_option_cuts_and_says_so(served, offline):
    settings = ServeSettings(truncate=True)
    with thread_server({"tiny": served}, settings) as base:
        r = post(base, {"input": ["short one", TOO_LONG]}, None)
        metrics = httpx.get(f"{base}/metrics").text
    assert r.status_code == 200
    assert r.json()["truncated"] == [1] and r.headers["X-Diffcse-Truncated"] == "1"
    got = np.array([d["embedding"] for d in r.json()["data"]])
    assert_same_rows(got, want(offline, ["short one", TOO_LONG]))  # encode truncates too
    assert (
        r.json()["usage"]["prompt_tokens"] == len(offline.tokenizer.encode("short one").ids) + 128
    )
    assert metric(metrics, 'diffcse_inputs_truncated_total{model="tiny"}') == 1

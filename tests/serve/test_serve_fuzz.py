"""Property-based fuzz of the live server (issue 23): any request body, Content-Type, Host,
Origin and Authorization value gets a JSON answer, an error being OpenAI's error JSON with a
4xx status; never a 500, a plain-text error or a dropped connection.

One uvicorn server in a thread on 127.0.0.1 (tiny model, an API key, small limits) for the
module; hypothesis sends a bounded number of requests with httpx.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from diffcse_runtime import Encoder  # noqa: E402
from diffcse_runtime.serve import ServeSettings  # noqa: E402
from tests.support.serve_helpers import thread_server  # noqa: E402

KEY = "fuzz key 0123"
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PATHS = ["/v1/embeddings", "/v1/models", "/v1/models/tiny", "/v1/models/x/y", "/health", "/nope"]

# Header values HTTP can carry: visible bytes, obs-text, inner spaces and tabs.
HEADER_BYTES = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c <= 126 or c >= 128).strip(b" \t")
)
HEADER = HEADER_BYTES.filter(bool)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
REQUEST = st.fixed_dictionaries(
    {},
    optional={
        "input": st.one_of(
            st.text(max_size=60), st.lists(st.one_of(st.text(max_size=30), JSONISH), max_size=6)
        ),
        "model": st.one_of(st.sampled_from(["tiny", "TINY", ""]), JSONISH),
        "encoding_format": st.one_of(st.sampled_from(["float", "base64", "hex"]), JSONISH),
        "dimensions": st.one_of(st.integers(min_value=-(2**70), max_value=2**70), JSONISH),
        "user": JSONISH,
        "extra": JSONISH,
    },
)
BODY = st.one_of(
    REQUEST.map(lambda d: json.dumps(d).encode()),
    JSONISH.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=80),
)
CONTENT_TYPE = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"application/json; charset=utf-8",
            b"application/vnd.api+json",
            b"text/plain",
            b"application/x-www-form-urlencoded",
            b"",
        ]
    ),
    HEADER_BYTES,
)
AUTH = st.one_of(
    st.just(b"Bearer " + KEY.encode()),
    st.just(b"bearer  " + KEY.encode()),
    HEADER_BYTES.map(lambda b: (b"Bearer " + b).strip()),
    HEADER_BYTES,
)


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    enc = Encoder(tiny_model_dir, intra_op_threads=1)
    limits = ServeSettings(api_keys=(KEY,), max_inputs=8, max_body_bytes=4096)
    with thread_server({"tiny": enc}, limits) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=30) as session:
        yield session


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    if r.status_code >= 400:
        assert 400 <= r.status_code < 500
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    elif r.request.url.path == "/v1/embeddings":
        assert body["object"] == "list" and body["data"]


@FUZZ
@given(
    path=st.sampled_from(PATHS),
    method=st.sampled_from(["POST", "POST", "GET", "OPTIONS", "PUT", "DELETE"]),
    body=BODY,
    content_type=st.one_of(st.none(), CONTENT_TYPE),
    auth=st.one_of(st.none(), AUTH),
)
def test_any_request_gets_json_and_never_a_5xx(http, path, method, body, content_type, auth):
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if auth is not None:
        headers["Authorization"] = auth
    content = body if method in ("POST", "PUT") else None
    check_answer(http.request(method, path, content=content, headers=headers))


@FUZZ
@given(
    host=st.one_of(
        st.sampled_from([b"127.0.0.1", b"localhost:1", b"[::1]", b"[::1"]), HEADER_BYTES
    ),
    origin=st.one_of(st.none(), st.just(b"null"), HEADER_BYTES),
    request=REQUEST,
)
def test_any_host_and_origin_gets_json_and_never_a_5xx(http, host, origin, request):
    headers = {"Host": host, "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if origin is not None:
        headers["Origin"] = origin
    r = http.post("/v1/embeddings", content=json.dumps(request).encode(), headers=headers)
    check_answer(r)
    if origin is not None:
        assert r.status_code == 400 or r.status_code == 403  # a foreign host, or any origin

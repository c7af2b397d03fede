"""diffcse-serve against hostile input (issue 23): hosts, origins, content types, whitespace
runs that hide text, tokenizing once and bounded, models.retrieve, `--model` paths with '='.

Every server is uvicorn in a thread on 127.0.0.1 with the tiny exported model (128 tokens),
driven by httpx and the real `openai` client; each test sends a bounded number of requests.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from diffcse_runtime import Encoder  # noqa: E402
from diffcse_runtime.serve import ServeSettings  # noqa: E402
from diffcse_runtime.serve.cli import parse_models  # noqa: E402
from diffcse_runtime.truncation import CUT_MAX_CHARS_PER_TOKEN  # noqa: E402
from tests.support.serve_helpers import SHORT, assert_same_rows, thread_server  # noqa: E402

# Issue 23, defect 8: the whitespace run pushes the tail past the characters read per text.
HIDDEN = "stock markets crashed" + " " * 40000 + "because of the war in europe"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def encoder(tiny_model_dir) -> Encoder:
    return Encoder(tiny_model_dir, intra_op_threads=1)


@pytest.fixture(scope="module")
def url(encoder):
    with thread_server({"tiny": encoder}, ServeSettings()) as base:
        yield base


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ------------------------------------------------------------------ defect 6: browsers


def test_a_foreign_host_header_is_refused_with_json(url):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host."""
    for path in ("/v1/models", "/health", "/metrics"):
        err = error_of(httpx.get(f"{url}{path}", headers={"Host": "evil.example"}), 400)
        assert err["code"] == "host_not_allowed" and "evil.example" in err["message"]
    r = httpx.post(
        f"{url}/v1/embeddings", json={"input": "x"}, headers={"Host": "evil.example:8080"}
    )
    error_of(r, 400)
    port = url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_option_and_wildcard(encoder):
    with thread_server({"tiny": encoder}, ServeSettings(allowed_hosts=("api.example",))) as base:
        assert httpx.get(f"{base}/health", headers={"Host": "api.example"}).status_code == 200
        error_of(httpx.get(f"{base}/health"), 400)  # 127.0.0.1 is not in the list
    with thread_server({"tiny": encoder}, ServeSettings(allowed_hosts=("*",))) as base:
        assert httpx.get(f"{base}/health", headers={"Host": "any.example"}).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
def test_a_body_that_is_not_json_is_refused_with_415(url, content_type):
    """A cross-origin text/plain (or form) POST needs no preflight: it must not run."""
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.post(f"{url}/v1/embeddings", content=b'{"input": "x"}', headers=headers)
    err = error_of(r, 415)
    assert "application/json" in err["message"]
    ok = httpx.post(
        f"{url}/v1/embeddings",
        content=b'{"input": "x"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


def test_cors_preflight_only_for_the_listed_origins(encoder):
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    with thread_server({"tiny": encoder}, ServeSettings()) as base:  # none by default
        r = httpx.options(f"{base}/v1/embeddings", headers=preflight)
        error_of(r, 403)
        assert "access-control-allow-origin" not in r.headers
        r = httpx.post(
            f"{base}/v1/embeddings", json={"input": "x"}, headers={"Origin": "https://evil.example"}
        )
        assert error_of(r, 403)["code"] == "origin_not_allowed"
    settings = ServeSettings(cors_origins=("https://app.example",))
    with thread_server({"tiny": encoder}, settings) as base:
        error_of(httpx.options(f"{base}/v1/embeddings", headers=preflight), 403)
        r = httpx.options(
            f"{base}/v1/embeddings", headers={**preflight, "Origin": "https://app.example"}
        )
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.post(
            f"{base}/v1/embeddings", json={"input": "x"}, headers={"Origin": "https://app.example"}
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"


# ------------------------------------------------------------------ defect 8: hidden text


def test_a_whitespace_run_that_hides_text_is_refused_without_truncate(url):
    err = error_of(httpx.post(f"{url}/v1/embeddings", json={"input": HIDDEN}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "input"
    assert "characters" in err["message"] and "--truncate" in err["message"]
    r = httpx.post(f"{url}/v1/embeddings", json={"input": ["fine", HIDDEN]})
    assert error_of(r, 400)["param"] == "input[1]"


def test_a_whitespace_run_that_hides_text_is_reported_with_truncate(encoder):
    with thread_server({"tiny": encoder}, ServeSettings(truncate=True)) as base:
        r = httpx.post(f"{base}/v1/embeddings", json={"input": ["fine", HIDDEN]})
    assert r.status_code == 200
    assert r.json()["truncated"] == [1] and r.headers["X-Diffcse-Truncated"] == "1"
    got = np.array([d["embedding"] for d in r.json()["data"]])
    assert_same_rows(got, encoder.encode(["fine", HIDDEN], normalize=True))


def test_encode_reports_the_hidden_text_as_cut_at_characters(encoder, caplog):
    _, counts = encoder.encode([HIDDEN, "short"], return_token_counts=True)
    assert counts.truncated.tolist() == [True, False]
    with caplog.at_level(logging.WARNING, logger="diffcse_runtime"):
        encoder.encode([HIDDEN])
    text = caplog.text
    limit = CUT_MAX_CHARS_PER_TOKEN * encoder.max_seq_length
    assert f"{limit} characters" in text
    assert "longer than max_seq_length" not in text  # it is not: it has 21 tokens


# ------------------------------------------------------------------ defect 7: tokenize once


class SpyTokenizer:
    """The encoder's tokenizer, recording every text it is asked to tokenize."""

    def __init__(self, real) -> None:
        self.real = real
        self.seen: list[str] = []

    def encode_batch(self, texts, *args, **kwargs):
        self.seen.extend(texts)
        return self.real.encode_batch(texts, *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        self.seen.append(text)
        return self.real.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_each_text_is_tokenized_once_and_never_whole(tiny_model_dir):
    enc = Encoder(tiny_model_dir, intra_op_threads=1)
    spy = SpyTokenizer(enc.tokenizer)
    enc.tokenizer = spy
    huge = "word " * 200_000  # 1 MB
    texts = [SHORT[0], huge, SHORT[1]]
    with thread_server({"tiny": enc}, ServeSettings(truncate=True)) as base:
        spy.seen.clear()
        r = httpx.post(f"{base}/v1/embeddings", json={"input": texts}, timeout=60)
    assert r.status_code == 200 and r.json()["truncated"] == [1]
    bound = CUT_MAX_CHARS_PER_TOKEN * enc.max_seq_length
    assert max(map(len, spy.seen)) <= bound  # the 1 MB text is never tokenized whole
    assert spy.seen.count(SHORT[0]) == 1 and spy.seen.count(SHORT[1]) == 1  # once, not twice
    offline = Encoder(tiny_model_dir, intra_op_threads=1)
    got = np.array([d["embedding"] for d in r.json()["data"]])
    assert_same_rows(got, offline.encode(texts, normalize=True))
    usage = r.json()["usage"]["prompt_tokens"]
    assert usage == sum(min(len(offline.tokenizer.encode(t).ids), 128) for t in texts)


# ------------------------------------------------------------------ defect 10: models.retrieve


def test_openai_models_retrieve(url, encoder):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.object == "model" and card.owned_by == "diffcse"
    assert card.model_extra["embedding_dim"] == encoder.embedding_dim
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.models.retrieve("gpt-9")


# ------------------------------------------------------------------ defect 19: '=' in a path


def test_an_existing_directory_with_equals_in_its_name_is_a_path(tmp_path, tiny_model_dir):
    folder = tmp_path / "run=3"
    shutil.copytree(tiny_model_dir, folder)
    assert parse_models((str(folder),)) == {"run=3": folder}
    assert parse_models((f"name={folder}",)) == {"name": folder}
    assert parse_models((f"name={tiny_model_dir}",)) == {"name": tiny_model_dir}


# ------------------------------------------------------------------ the CLI's checks


def test_default_allowed_hosts_follow_the_bound_address():
    from diffcse_runtime.serve.cli import default_allowed_hosts

    assert default_allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "::1")
    assert set(default_allowed_hosts("::1")) == {"::1", "127.0.0.1", "localhost"}
    assert set(default_allowed_hosts("localhost")) == {"localhost", "127.0.0.1", "::1"}
    assert default_allowed_hosts("10.0.0.5") == ("10.0.0.5",)
    assert default_allowed_hosts("0.0.0.0") == ("*",) == default_allowed_hosts("::")


def test_keys_an_http_header_cannot_carry_are_refused(tiny_model_dir, encoder):
    from click.testing import CliRunner

    from diffcse_runtime.errors import DiffcseError
    from diffcse_runtime.serve import create_app
    from diffcse_runtime.serve.cli import serve

    for key, why in (
        (" lead", "begins or ends with whitespace"),
        ("trail ", "begins or ends with whitespace"),
        ("caf\u00e9", "printable ASCII"),
        ("a\tb", "printable ASCII"),
    ):
        r = CliRunner().invoke(serve, ["-m", str(tiny_model_dir), "--api-key", key])
        assert r.exit_code == 1 and why in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(serve, ["-m", str(tiny_model_dir), "--cors-origins", "evil.example"])
    assert r.exit_code == 2 and "--cors-origins" in r.output
    with pytest.raises(DiffcseError, match="empty or only whitespace"):
        create_app({"tiny": encoder}, ServeSettings(api_keys=(" ",)))


def test_a_stalled_body_gets_408_json(encoder):
    """A client that sends half its body and stalls held its connection for ever."""
    import socket
    import time

    with thread_server({"tiny": encoder}, ServeSettings(body_timeout_s=1.0)) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            began = time.monotonic()
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                b'{"input": "a'
            )
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            waited = time.monotonic() - began
        assert httpx.post(f"{base}/v1/embeddings", json={"input": "x"}).status_code == 200
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 0.9 < waited < 10


@pytest.mark.parametrize(
    "option, value",
    [("--max-wait-ms", "nan"), ("--body-timeout", "inf"), ("--graceful-timeout", "-1")],
)
def test_time_options_must_be_finite_and_in_range(tmp_path, option, value):
    """click's FloatRange lets NaN through (nan < 0 is False); these are refused by name."""
    from click.testing import CliRunner

    from diffcse_runtime.serve.cli import serve

    result = CliRunner().invoke(serve, ["-m", str(tmp_path), option, value])
    assert result.exit_code == 2
    assert option in result.output and "finite number" in result.output

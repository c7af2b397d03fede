"""diffcse-serve as a process: graceful SIGTERM with requests in flight, and CLI errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from click.testing import CliRunner  # noqa: E402

from diffcse_runtime import Encoder  # noqa: E402
from diffcse_runtime.serve.cli import serve  # noqa: E402
from tests.support.serve_helpers import (  # noqa: E402
    SHORT,
    assert_same_rows,
    free_port,
    metric,
    start_process,
    wait_ready,
)

pytestmark = pytest.mark.slow  # real diffcse-serve processes


def test_sigterm_finishes_requests_in_flight_then_exits_0(tiny_model_dir):
    """A worker that waits 2 s for its batch to fill keeps four requests in flight while
    SIGTERM arrives: each still gets its embeddings, new connections are refused, exit 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_process(tiny_model_dir, port, "--max-wait-ms", "2000", "--api-key", "k-123")
    try:
        wait_ready(url, proc)
        batches = [SHORT[i : i + 3] for i in range(0, 12, 3)]
        headers = {"Authorization": "Bearer k-123"}

        def send(texts):
            return httpx.post(
                f"{url}/v1/embeddings", json={"input": texts}, headers=headers, timeout=30
            )

        with ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(send, b) for b in batches]
            deadline = time.monotonic() + 10
            while metric(httpx.get(f"{url}/metrics").text, "diffcse_requests_in_flight") < 4:
                assert time.monotonic() < deadline, "the requests never arrived"
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(f"{url}/health", timeout=2)
            responses = [f.result() for f in pending]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    offline = Encoder(tiny_model_dir, intra_op_threads=1)
    for texts, r in zip(batches, responses, strict=True):
        assert r.status_code == 200
        got = np.array([d["embedding"] for d in r.json()["data"]])
        assert_same_rows(got, offline.encode(texts, normalize=True))
    log = proc.stderr.read()
    assert "Shutting down" in log
    assert '"path":"/v1/embeddings","status":200' in log  # one JSON line per request
    assert "k-123" not in log and SHORT[0] not in log  # never keys or text


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir):
    runner = CliRunner()
    r = runner.invoke(serve, ["--model", str(tmp_path / "missing")])
    assert r.exit_code == 1
    assert "missing" in r.output and "Traceback" not in r.output
    r = runner.invoke(serve, ["--model", str(tiny_model_dir), "--max-queue", "10"])
    assert r.exit_code == 2 and "--max-queue" in r.output
    r = runner.invoke(serve, ["--model", f"a={tiny_model_dir}", "--model", f"a={tiny_model_dir}"])
    assert r.exit_code == 2 and "two models are named 'a'" in r.output


def test_default_layout_is_runs_of_up_to_four_threads_filling_the_cores(monkeypatch):
    from diffcse_runtime.serve import cli

    for cores, default in ((1, (1, 1)), (2, (1, 2)), (4, (1, 4)), (6, (2, 3)), (16, (4, 4))):
        monkeypatch.setattr(cli, "usable_cpus", lambda cores=cores: cores)
        assert cli.worker_layout(None, None) == default  # the measured default
    monkeypatch.setattr(cli, "usable_cpus", lambda: 4)
    assert cli.worker_layout(None, 1) == (4, 1)  # threads given: runs fill the cores
    assert cli.worker_layout(1, None) == (1, 4)  # workers given: the cores are shared out
    assert cli.worker_layout(3, 3) == (3, 3)  # both given: as asked


# ------------------------------------------------------------------ issue 23: keys, SIGTERM


def _served_process(model_dir, *args, env=None):
    """A started diffcse-serve process on a free loopback port and its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "diffcse_runtime.serve.cli", "--model", f"tiny={model_dir}"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--threads", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _status(url: str, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/embeddings", json={"input": "a cat"}, headers=headers).status_code


@pytest.mark.slow
def test_the_env_key_is_one_opaque_string(tiny_model_dir):
    """DIFFCSE_API_KEY='correct horse battery staple' accepted 'horse' and refused itself."""
    key = "correct horse battery staple"
    proc, url = _served_process(tiny_model_dir, env={**os.environ, "DIFFCSE_API_KEY": key})
    try:
        assert [_status(url, k) for k in ("horse", "correct", key, key + "s")] == [
            401,
            401,
            200,
            401,
        ]
    finally:
        _stop(proc)


@pytest.mark.slow
def test_a_key_file_keeps_the_key_off_the_command_line(tiny_model_dir, tmp_path):
    key = "s3cret key with spaces"
    (tmp_path / "key").write_text(key + "\n")
    env = {k: v for k, v in os.environ.items() if k != "DIFFCSE_API_KEY"}
    proc, url = _served_process(tiny_model_dir, "--api-key-file", str(tmp_path / "key"), env=env)
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert "s3cret" not in cmdline
        assert [_status(url, k) for k in (key, key + "x", "s3cret", key[:-1])] == [
            200,
            401,
            401,
            401,
        ]
    finally:
        _stop(proc)


def test_an_empty_key_from_any_source_is_refused_the_same_way(tiny_model_dir, tmp_path):
    """`--api-key ''` was refused while `DIFFCSE_API_KEY=` served without authentication."""
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "blank").write_text("  \t\n")
    base = [sys.executable, "-m", "diffcse_runtime.serve.cli", "-m", str(tiny_model_dir)]
    base += ["--host", "127.0.0.1", "--port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if k != "DIFFCSE_API_KEY"}
    cases = [
        ([], {"DIFFCSE_API_KEY": ""}, "DIFFCSE_API_KEY"),
        ([], {"DIFFCSE_API_KEY": "   "}, "DIFFCSE_API_KEY"),
        (["--api-key", ""], {}, "--api-key"),
        (["--api-key", " "], {}, "--api-key"),
        (["--api-key-file", str(tmp_path / "empty")], {}, "--api-key-file"),
        (["--api-key-file", str(tmp_path / "blank")], {}, "--api-key-file"),
    ]
    for args, extra, source in cases:
        r = subprocess.run(
            base + args, env={**env, **extra}, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 1, (args, extra, r.stderr[-500:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and source in lines[0], r.stderr
        assert "the API key is empty or only whitespace" in lines[0]


@pytest.mark.slow
def test_sigterm_while_a_body_is_half_sent_answers_json_and_logs_no_traceback(tiny_model_dir):
    """It logged a 62-line traceback after the grace period and sent a plain-text 500."""
    proc, url = _served_process(tiny_model_dir, "--graceful-timeout", "20")
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                b'{"input": "a cat'
            )
            time.sleep(0.5)
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            waited = time.monotonic() - began
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), reply
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "shutting_down"
    assert waited < 10  # answered at once, not after the 20 s grace period
    log = proc.stderr.read()
    assert "Traceback" not in log and "CancelledError" not in log, log[-2000:]

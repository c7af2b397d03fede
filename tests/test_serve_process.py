"""diffcse-serve as a process: graceful SIGTERM with requests in flight, and CLI errors."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from click.testing import CliRunner  # noqa: E402
from serve_helpers import (  # noqa: E402
    SHORT,
    assert_same_rows,
    free_port,
    metric,
    start_process,
    wait_ready,
)

from diffcse_runtime import Encoder  # noqa: E402
from diffcse_runtime.serve.cli import serve  # noqa: E402


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

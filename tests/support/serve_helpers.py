"""Live diffcse-serve servers for the tests: in a thread (uvicorn.Server) or a subprocess.

Both bind 127.0.0.1 only. The thread server takes a socket the test bound to port 0, so
there is no free-port race; the subprocess gets a port probed just before it starts.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from diffcse_runtime import Encoder
from tests.support import tiny

# Short corpus sentences, ~100-token texts, and texts far over the tiny model's 128 tokens.
SHORT = tiny.corpus(200, seed=3)
LONG = [" ".join(tiny.corpus(11, seed=100 + i)) for i in range(40)]
TOO_LONG = " ".join(tiny.corpus(60, seed=7))


@contextlib.contextmanager
def thread_server(models: dict[str, Encoder], settings) -> Iterator[str]:
    """Run create_app(models, settings) on uvicorn in a thread; yield its base URL."""
    import uvicorn

    from diffcse_runtime.serve import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(models, settings), log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(model_dir: Path, port: int, *args: str) -> subprocess.Popen:
    """`python -m diffcse_runtime.serve.cli --model tiny=DIR --port PORT ARGS` on 127.0.0.1."""
    cmd = [sys.executable, "-m", "diffcse_runtime.serve.cli", "--model", f"tiny={model_dir}"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--threads", "1", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited early: {proc.stderr.read()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} was not ready after {timeout} s")


def metric(text: str, key: str) -> float:
    """The value of the sample `key` (name plus labels, as printed) in a Prometheus text
    exposition; 0 when absent (a labelled series appears only once it has a value)."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == key:
            return float(value)
    return 0.0


def assert_same_rows(got: np.ndarray, want: np.ndarray) -> None:
    """Served rows equal the offline ones: same shape, cosine >= 0.99999, close values."""
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.99999, cos.min()
    np.testing.assert_allclose(got, want, atol=1e-5)

"""diffcse-serve under a bounded flood of the largest requests its limits allow (issue 23,
defect 7): the process's peak memory stays within the bound `memory_bound` states.

One server process on 127.0.0.1 with the default limits (8 MiB bodies, 2048 inputs) and
--truncate, so every request is embedded; 4 clients send 3 requests each (12 in all), each
near the body limit: one 7.5 MB string (it cost +1.3 GB and 4.9 s before), 2048 texts of
~4 kB, and a text whose tail hides behind a whitespace run. The peak is the kernel's
VmHWM of the server process, against its resident size once ready and warmed up.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from diffcse_runtime import Encoder  # noqa: E402
from diffcse_runtime.serve import ServeSettings  # noqa: E402
from diffcse_runtime.serve.served import TOKENIZING_BYTES, memory_bound  # noqa: E402
from tests.support.serve_helpers import free_port, start_process, wait_ready  # noqa: E402

CLIENTS = 4
# Run-time slack the bound does not model: onnxruntime's buffers for one 8192-token batch of
# the tiny model, the allocator's arenas for the worker threads, and the event loop's state.
SLACK = 64 * 2**20


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _bodies() -> list[dict]:
    word = {"input": "word " * 1_500_000}  # 7.5 MB
    many = {"input": [f"text number {i} " * 230 for i in range(2048)]}  # ~8 MB
    hidden = {"input": "stock markets crashed" + " " * 7_000_000 + "because of the war"}
    return [word, many, hidden]


@pytest.mark.slow
def test_peak_memory_under_a_flood_of_large_requests_stays_within_the_bound(tiny_model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_process(tiny_model_dir, port, "--truncate", "--log-level", "warning")
    try:
        wait_ready(url, proc)
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "warm up"}).status_code == 200
        base = _kib(proc.pid, "VmRSS")
        bodies = _bodies()
        start = threading.Barrier(CLIENTS)

        def client(_: int) -> list[int]:
            start.wait()
            with httpx.Client(timeout=120) as session:
                return [session.post(f"{url}/v1/embeddings", json=b).status_code for b in bodies]

        with ThreadPoolExecutor(CLIENTS) as pool:
            statuses = [s for c in pool.map(client, range(CLIENTS)) for s in c]
        peak = _kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert statuses == [200] * (CLIENTS * len(bodies))
    enc = Encoder(tiny_model_dir, intra_op_threads=1)
    per_request = memory_bound(ServeSettings(), enc.max_seq_length, enc.embedding_dim)
    allowed = CLIENTS * per_request + TOKENIZING_BYTES + SLACK
    grew = peak - base
    print(f"grew {grew / 2**20:.0f} MiB of {allowed / 2**20:.0f}")
    assert grew <= allowed, f"peak grew {grew / 2**20:.0f} MiB, bound {allowed / 2**20:.0f} MiB"

"""Each script in examples/ runs as a user would run it, on the packaged all-MiniLM-L6-v2
(exported once per session by README.md's first block), and does what it says."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.docs_helpers import ROOT, env, session_model, start_server, stop, workspace

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def my_model(tmp_path_factory):
    pytest.importorskip("torch")
    return session_model(tmp_path_factory.mktemp("docs-model"))


@pytest.fixture
def cwd(my_model, tmp_path) -> Path:
    return workspace(tmp_path / "work", my_model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], cwd: Path, timeout: float, **extra: str) -> str:
    done = subprocess.run(
        args, cwd=cwd, env={**env(), **extra}, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def server(cwd):
    """diffcse-serve on my-model, with an API key, on a free local port."""
    port = free_port()
    cmd = ["diffcse-serve", "--model", "my-model", "--port", str(port), "--threads", "1"]
    proc = start_server(
        cmd,
        cwd,
        f"http://127.0.0.1:{port}/ready",
        "diffcse-serve",
        extra_env={"DIFFCSE_API_KEY": "k"},
    )
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


@pytest.mark.slow
def test_encode_search_finds_the_plant_sentences(cwd):
    out = run(
        [sys.executable, str(EXAMPLES / "encode_search.py"), "my-model", "how do plants make food"],
        cwd,
        120,
    )
    hits = out.splitlines()[:3]
    assert "Plants make their food" in hits[0] or "Photosynthesis" in hits[0], out
    assert "5 vectors of 384 dimensions" in out


@pytest.mark.slow
def test_openai_client(server, cwd):
    out = run(
        [sys.executable, str(EXAMPLES / "openai_client.py"), server], cwd, 120, DIFFCSE_API_KEY="k"
    )
    assert "model my-model: (3, 384)" in out
    lines = dict(line.split(" = ") for line in out.splitlines() if " = " in line)
    assert float(lines["cosine(guitar, music)"]) > float(lines["cosine(guitar, market)"])
    assert "base64 row equals the float row: True" in out


@pytest.mark.slow
def test_langchain_rag_retrieves_the_plant_passage(server, cwd):
    pytest.importorskip("langchain_openai")
    out = run(
        [sys.executable, str(EXAMPLES / "langchain_rag.py"), server, "What do plants need?"],
        cwd, 120, DIFFCSE_API_KEY="k",
    )  # fmt: skip
    first = out.splitlines()[0]
    assert first.startswith("- Plants need light"), out


@pytest.mark.slow
def test_ray_job_writes_every_row(cwd):
    pytest.importorskip("ray")
    out = run([sys.executable, str(EXAMPLES / "ray_job.py"), "my-model", "out"], cwd, 300)
    assert "wrote 1000 rows" in out
    import pyarrow.parquet as pq

    table = pq.read_table(cwd / "out")
    assert table.num_rows == 1000 and "embedding" in table.column_names


@pytest.mark.slow
def test_train_then_serve(tmp_path):
    pytest.importorskip("torch")
    out = run(
        ["bash", str(EXAMPLES / "train_then_serve.sh")], ROOT, 900,
        STEPS="2", RUN=str(tmp_path / "run"), PORT=str(free_port()),
    )  # fmt: skip
    assert "384 dimensions" in out, out
    assert (tmp_path / "run" / "model" / "model.onnx").is_file()
    assert (tmp_path / "run" / "model-int8" / "model.onnx").is_file()

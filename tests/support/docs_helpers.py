"""Run the code blocks of the documentation as a reader would, and the examples beside it.

The convention (docs/contributing.md says the same for writers):
- every fenced block names its language; `bash` and `python` blocks run, `text`, `yaml`,
  `json` and `toml` blocks are output or data and never run;
- `<!-- skip: REASON -->` on the line before a block keeps it from running; the reason is
  required (GPU, cluster, hub, long training, installs packages, ...);
- `<!-- background: URL -->` starts the block in the background and waits until URL answers
  200 (a server); it is stopped with SIGTERM when the page is done;
- `<!-- makes: my-model -->` marks README.md's block that makes the model every page uses:
  it runs once per test session, and each page starts in a fresh folder holding `my-model`
  and the repository's `configs/`, as a checkout does.

A page's blocks run in order in one folder, like a reader typing them in one shell: bash
with `set -euo pipefail`, python with the interpreter running the tests, both with this
interpreter's folder (the project's venv) first on PATH.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = ("bash", "python")
DATA = ("text", "yaml", "json", "toml")
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^`]*)$")
MARKER = re.compile(r"^<!--\s*(?P<kind>skip|background|makes)\s*:\s*(?P<arg>.*?)\s*-->$")
BLOCK_TIMEOUT = 600


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str = ""  # skip | background | makes | ""
    arg: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the marker on the line before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, start = len(match["indent"]), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        code = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        found.append(
            Block(
                path,
                start + 1,
                match["info"].strip().split(" ")[0],
                code,
                marker["kind"] if marker else "",
                marker["arg"] if marker else "",
            )
        )
        i = end + 1
    return found


def env() -> dict[str, str]:
    """The tests' environment with this interpreter's folder first on PATH."""
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out.setdefault("OMP_NUM_THREADS", "1")
    out["PYTHONUNBUFFERED"] = "1"
    return out


def command(block: Block) -> list[str]:
    if block.lang == "bash":
        return ["bash", "-euo", "pipefail", "-c", block.code]
    return [sys.executable, "-c", block.code]


def run_block(block: Block, cwd: Path) -> None:
    """Run one block; a failure raises AssertionError with its output and FILE:LINE."""
    done = subprocess.run(
        command(block), cwd=cwd, env=env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{block.where}: the {block.lang} block exited {done.returncode}\n"
            f"--- code\n{block.code}--- stdout\n{done.stdout[-4000:]}\n"
            f"--- stderr\n{done.stderr[-4000:]}"
        )


def start_background(block: Block, cwd: Path, timeout: float = 90) -> subprocess.Popen:
    """Start a server block and wait until its URL answers 200."""
    return start_server(command(block), cwd, block.arg, block.where, timeout)


def start_server(
    cmd: list[str], cwd: Path, url: str, where: str, timeout: float = 90, extra_env=None
) -> subprocess.Popen:
    """Start `cmd` in its own process group and wait until `url` answers 200; its output
    goes to a log in `cwd`, quoted if it exits or never answers."""
    log_path = cwd / f".server-{abs(hash(url))}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env={**env(), **(extra_env or {})}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"{where}: the server exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise AssertionError(f"{where}: {url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the block's process group, then SIGKILL what is left after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_page(path: Path, cwd: Path) -> int:
    """Run every block of a page that is not skipped; returns how many ran."""
    servers, ran = [], 0
    try:
        for block in blocks(path):
            if block.lang not in RUNS or block.marker in ("skip", "makes"):
                continue
            if block.marker == "background":
                servers.append(start_background(block, cwd))
            else:
                run_block(block, cwd)
            ran += 1
    finally:
        for proc in servers:
            stop(proc)
    return ran


_MODEL: Path | None = None


def session_model(base: Path) -> Path:
    """`my-model`, made once per session by README.md's block marked `makes: my-model`
    (or `$DIFFCSE_DOCS_MODEL`, a folder it made before, to iterate on the docs faster)."""
    global _MODEL
    if _MODEL is None and os.environ.get("DIFFCSE_DOCS_MODEL"):  # iterating on the docs
        _MODEL = Path(os.environ["DIFFCSE_DOCS_MODEL"]).resolve()
    if _MODEL is None:
        (maker,) = [b for b in blocks(ROOT / "README.md") if b.marker == "makes"]
        run_block(maker, base)
        _MODEL = base / maker.arg
        assert (_MODEL / "model.onnx").is_file(), f"{maker.where} made no {_MODEL}"
    return _MODEL


def workspace(tmp: Path, model: Path) -> Path:
    """A fresh folder for one page or example, as a checkout looks to a reader: `configs/`
    (a link to the repository's) and `my-model` (a link to the session's)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "my-model").symlink_to(model, target_is_directory=True)
    (tmp / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    return tmp

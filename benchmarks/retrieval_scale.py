"""Retrieval at scale: index build and query latency, peak memory, for 10k-1M unit vectors.

Random unit vectors of dimension 384 and 768 (the MiniLM and BERT-base widths) go through
`diffcse_runtime.retrieval.Index`, the API users call: backend "numpy" is the runtime's exact
chunked top-k; "faiss" (IndexFlatIP, exact) and "usearch" (HNSW, approximate) are measured
when installed. Each size runs in a fresh child process so its peak RSS is its own.

Reported per (n, dim, backend): build seconds (constructor + the lazy ANN build), latency
of one query (median), throughput of a 1,000-query batch, recall@10 against exact search,
resident memory the index added and the peak during build+query (Linux VmHWM, reset
before each backend). Backends are built together and their queries interleaved
round-robin when they fit in --max-gb; otherwise one after another (noted in the JSON).
usearch's HNSW build is slow on 2 cores (~3 ms per vector), so it runs up to
--usearch-max-n vectors only (default 10,000).

Run: python -m benchmarks.retrieval_scale
     python -m benchmarks.retrieval_scale --sizes 10000 --dims 384   (smoke)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import benchlib

K = 10


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def random_units(n: int, dim: int, seed: int) -> np.ndarray:
    """n random unit vectors, generated and normalised in chunks to bound the peak."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - s), dim), dtype=np.float32)
        out[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def child(n: int, dim: int, backends: list[str], rounds: int, max_gb: float) -> dict:
    """Measure all backends for one (n, dim); runs inside a fresh process."""
    from diffcse_runtime.retrieval import Index

    data = random_units(n, dim, seed=n + dim)
    queries = random_units(1000, dim, seed=1)
    texts = [""] * n
    exact_ids = None
    together = len(backends) * 2 * data.nbytes / 2**30 <= max_gb
    built, out = {}, {}

    def build(b: str) -> None:
        gc.collect()
        peak_ok = _reset_peak()
        rss0 = _status_kb("VmRSS")
        t0 = time.perf_counter()
        index = Index(data, texts, backend=b)
        index.search_vectors(queries[:1], K)  # faiss/usearch build lazily on first search
        seconds = time.perf_counter() - t0
        built[b] = index
        out[b] = {
            "build_s": seconds,
            "added_mb": (_status_kb("VmRSS") - rss0) / 1024,
            "peak_mb_build": (_status_kb("VmHWM") - rss0) / 1024 if peak_ok else None,
            "one_query_s": [],
            "batch_1000_s": [],
        }

    def query_round(b: str) -> None:
        index = built[b]
        t0 = time.perf_counter()
        for q in queries[:20]:
            index.search_vectors(q, K)
        out[b]["one_query_s"].append((time.perf_counter() - t0) / 20)
        t0 = time.perf_counter()
        _, ids = index.search_vectors(queries, K)
        out[b]["batch_1000_s"].append(time.perf_counter() - t0)
        out[b]["_ids"] = ids

    def finish(b: str) -> None:
        nonlocal exact_ids
        ids = out[b].pop("_ids")
        if b == "numpy":
            exact_ids = ids
        if exact_ids is not None:
            hits = [len(set(a) & set(e)) for a, e in zip(ids, exact_ids, strict=True)]
            out[b]["recall@10"] = float(np.mean(hits)) / K
        out[b]["peak_mb_total"] = _status_kb("VmHWM") / 1024

    if together:
        for b in backends:
            build(b)
        for r in range(rounds):
            for b in backends[r % len(backends) :] + backends[: r % len(backends)]:
                query_round(b)
        for b in backends:
            finish(b)
    else:
        for b in backends:
            build(b)
            for _ in range(rounds):
                query_round(b)
            finish(b)
            del built[b]
    return {"n": n, "dim": dim, "data_mb": data.nbytes / 2**20, "interleaved": together, **out}


def arguments() -> argparse.Namespace:
    p = benchlib.parser("retrieval_scale", __doc__, "rounds")
    p.add_argument("--sizes", type=benchlib.positive_ints, default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dims", type=benchlib.positive_ints, default=[384, 768])
    p.add_argument("--backends", default="numpy,faiss,usearch")
    p.add_argument(
        "--usearch-max-n",
        type=benchlib.positive_int,
        default=10000,
        help="largest n for usearch: its HNSW build took ~3 ms/vector on 2 busy cores",
    )
    p.add_argument(
        "--max-gb",
        type=benchlib.positive_float,
        default=8.0,
        help="memory for interleaving backends",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one case, in a fresh process
    args = p.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    return args


def run_case(n: int, dim: int, backends: list[str], args: argparse.Namespace) -> dict:
    """One (n, dim) measured in a fresh child process, so its peak RSS is its own."""
    cmd = [sys.executable, "-m", "benchmarks.retrieval_scale", "--child", f"{n}x{dim}"]
    cmd += ["--backends", ",".join(backends)]
    cmd += ["--rounds", str(args.rounds), "--max-gb", str(args.max_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=benchlib.ROOT)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["killed"]
        print(f"  {n}x{dim}: failed ({tail[0]})", file=sys.stderr)
        return {"n": n, "dim": dim, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def case_rows(case: dict, backends: list[str]) -> list[dict]:
    return [
        {
            "n": case["n"],
            "dim": case["dim"],
            "backend": b,
            "build s": case[b]["build_s"],
            "1 query ms": 1000 * benchlib.median(case[b]["one_query_s"]),
            "1000 q/s": 1000 / benchlib.median(case[b]["batch_1000_s"]),
            "recall@10": case[b].get("recall@10"),
            "index MB": case[b]["added_mb"],
            "peak MB": case[b]["peak_mb_build"],
            "data MB": case["data_mb"],
        }
        for b in backends
    ]


def main() -> None:
    args = arguments()
    if args.child:
        n, dim = map(int, args.child.split("x"))
        print(json.dumps(child(n, dim, args.backends, args.rounds, args.max_gb)))
        return
    missing = [b for b in args.backends if b != "numpy" and importlib.util.find_spec(b) is None]
    backends = [b for b in args.backends if b not in missing]
    info = benchlib.machine(threads=len(os.sched_getaffinity(0)))
    print(benchlib.describe(info))
    if "cuda" in benchlib.devices(args.device):
        print("# CUDA: the runtime's search is CPU numpy; faiss-gpu is not measured")
    result = {"benchmark": "retrieval_scale", "k": K, "not_installed": missing, "cases": []}
    rows = []
    for n in args.sizes:
        for dim in args.dims:
            here = [b for b in backends if b != "usearch" or n <= args.usearch_max_n]
            case = run_case(n, dim, here, args)
            result["cases"].append(case)
            if "error" not in case:
                rows += case_rows(case, here)
                print(f"  {n}x{dim} done", file=sys.stderr)
    result["rows"] = rows
    result["usearch_max_n"] = args.usearch_max_n
    result["machine"] = benchlib.finish_machine(info)
    cols = ["n", "dim", "backend", "build s", "1 query ms", "1000 q/s", "recall@10"]
    print(benchlib.table(rows, cols + ["index MB", "peak MB", "data MB"], 3))
    print(f"wrote {benchlib.write_json(args.out, result)}")


if __name__ == "__main__":
    benchlib.run_main(main)

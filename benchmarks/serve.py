"""Serving: diffcse-serve with dynamic batching vs the same server with batching off vs
offline `Encoder.encode` (the ceiling), at concurrency 1, 8 and 64.

Two `diffcse-serve` processes (same model directory, same onnxruntime threads; one started
with --no-batching) listen on 127.0.0.1. A load generator in this process (asyncio + httpx,
one connection per concurrent client, bodies prepared up front, base64 responses as the
openai client asks for them; or `--client wrk`, the same requests from wrk, a C load
generator that leaves the 2 cores to the server) keeps `c` requests in flight for a fixed
time per cell. Requests are 1 STS-B dev sentence or 32 consecutive ones. Offline figures
come from an `Encoder` in this process: the ceiling is `encode(1024 sentences,
batch_size=64)` throughput, and the bare latency is one `encode(request texts)` call, the
floor for a request at concurrency 1.

Cells run interleaved (each round visits every cell, contenders in rotating order) and the
table holds medians over rounds; ratios are medians of per-round paired ratios. The load
generator shares the machine's cores with the server, as a sidecar client would; the offline
ceiling pays no HTTP, JSON or client cost at all.

Goals (issue 13): at c=64 with 1-sentence requests >= 70% of the offline throughput and
>= 3x the unbatched server; p99 at c=1 within 2 ms of a bare encode call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import benchlib, models
from diffcse_runtime.parallel import usable_cpus

CONCURRENCY = [1, 8, 64]
SHAPES = {"1-sentence": 1, "32-sentence": 32}
SERVERS = {"batched": [], "unbatched": ["--no-batching"]}


def start_server(model: Path, port: int, layout: list[str], extra: list[str]) -> subprocess.Popen:
    """diffcse-serve on 127.0.0.1; `layout` is its --threads/--workers (empty: its defaults)."""
    exe = Path(sys.executable).parent / "diffcse-serve"
    # a source checkout on PYTHONPATH (the device machine's serve.sh) has no console script
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "diffcse_runtime.serve.cli"]
    cmd = [*launcher, "--model", f"m={model}", "--port", str(port), *layout]
    cmd += ["--log-level", "warning", *extra]
    log = log_file(f"serve-{port}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    proc.log_path = log.name  # Popen.stderr is None when it writes to a file
    return proc


def start_infinity(args, port: int, pooling: str) -> subprocess.Popen:
    """infinity-emb's server (its ONNX engine) from its own venv, on the same threads and
    with our model's pooling: its `auto` picks [CLS] for the mean-pooled MiniLM (cosines
    0.28-0.58 against the real embeddings)."""
    exe = args.infinity_venv.resolve() / "bin" / "infinity_emb"  # it runs in the model folder
    # model id "." run from the model folder: infinity-emb 0.0.78 with optimum 2.1 matches the
    # ONNX file by bare name and misses it under an absolute path.
    cmd = [str(exe), "v2", "--model-id", ".", "--engine", "optimum"]
    cmd += ["--device", "cpu", "--port", str(port), "--url-prefix", "/v1", "--batch-size", "64"]
    cmd += ["--pooling-method", pooling]
    threads = args.threads or usable_cpus()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    env.update(INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")  # no telemetry calls
    log = log_file("infinity")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=args.infinity_model
    )
    proc.log_path = log.name
    return proc


def log_file(name: str):
    """A server's stderr goes to a file (a full pipe would stall the server)."""
    import tempfile

    return tempfile.NamedTemporaryFile("w", prefix=f"{name}-", suffix=".log", delete=False)


def make_bodies(texts: list[str], model: str) -> dict[str, list[bytes]]:
    """Request bodies per shape, prepared once so the client spends no time on JSON."""
    return {
        shape: [
            json.dumps({"input": r, "model": model, "encoding_format": "base64"}).encode()
            for r in requests_of(texts, per)
        ]
        for shape, per in SHAPES.items()
    }


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise benchlib.BenchSkip(f"server exited, see {proc.log_path}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise benchlib.BenchSkip(f"diffcse-serve at {url} not ready after {timeout} s")


def parity(url: str, model: str, texts: list[str], encoder, n: int = 32) -> float:
    """Min cosine between a server's embeddings of `n` sentences and `encoder.encode`: a
    contender is timed only if it computes the same vectors (an export can be silently
    wrong), and the figure goes into the JSON."""
    import httpx

    body = {"input": texts[:n], "model": model, "encoding_format": "float"}
    got = httpx.post(f"{url}/v1/embeddings", json=body, timeout=120).json()
    rows = np.array([d["embedding"] for d in sorted(got["data"], key=lambda d: d["index"])])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    want = encoder.encode(texts[:n], normalize=True)
    cosine = float((rows * want).sum(axis=1).min())
    print(f"{url}: min cosine vs Encoder.encode over {n} sentences {cosine:.6f}", flush=True)
    if cosine < 0.999:
        raise benchlib.BenchSkip(f"{url} computes different embeddings (min cosine {cosine:.4f})")
    return cosine


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, bodies: list[bytes], per: int, conc: int, seconds: float) -> dict:
    """Keep `conc` requests in flight for `seconds`; sentences/s and latency percentiles."""
    import httpx

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(limits=limits, timeout=900) as client:
        start = time.perf_counter()
        end = start + seconds

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        f"{url}/v1/embeddings", content=bodies[i % len(bodies)], headers=headers
                    )
                    errors += r.status_code != 200
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - t0)
                i += conc

        await asyncio.gather(*(worker(k) for k in range(conc)))
        wall = time.perf_counter() - start
    return summary(latencies, per, wall, errors)


def wrk_load(
    url: str, bodies: list[bytes], per: int, conc: int, seconds: float, pid: int | None = None
) -> dict:
    """The same load from wrk (C, one thread): on 2 cores a Python client would take CPU the
    server needs, which a client on another machine would not."""
    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl") as fh:
        fh.write(b"\n".join(bodies) + b"\n")
        fh.flush()
        cmd = ["wrk", "-t1", f"-c{conc}", f"-d{max(1, round(seconds))}s", "--timeout", "60s"]
        cmd += ["-s", str(Path(__file__).with_name("serve_wrk.lua")), url]
        env = dict(os.environ, WRK_BODIES=fh.name)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    drain(url, pid)
    line = next(x for x in out.splitlines() if x.startswith("WRK "))
    r = json.loads(line[4:])
    wall = r["duration_us"] / 1e6
    return {
        "sent_per_s": r["requests"] * per / wall,
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "requests": r["requests"],
        "errors": r["errors"],
    }


def drain(url: str, pid: int | None = None, timeout: float = 120) -> None:
    """wrk stops with requests still in flight, and the server finishes them: wait until it
    has, so the next cell starts on an idle machine. diffcse-serve says so (its in-flight
    gauge is 0); for a peer without that gauge, wait until its process `pid` stops using
    CPU (under 10% of a core over 0.2 s): infinity-emb, undrained, kept computing through
    the next contender's cell and cut it by up to half (199-226 vs 376-408 sentences/s)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"{url}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        gauge = [x for x in text.splitlines() if x.startswith("diffcse_requests_in_flight ")]
        if gauge:
            if float(gauge[0].split()[1]) == 0:
                return
            time.sleep(0.05)
        elif pid is None or cpu_seconds_over(pid, 0.2) < 0.02:
            return


def cpu_seconds_over(pid: int, seconds: float) -> float:
    """CPU seconds process `pid` (all its threads) used during the next `seconds` (0 if it
    is gone)."""
    before = benchlib.proc_stat(pid)
    time.sleep(seconds)
    after = benchlib.proc_stat(pid)
    return after[1] - before[1] if before and after else 0.0


def summary(latencies: list[float], per: int, wall: float, errors: int = 0) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "sent_per_s": len(latencies) * per / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "requests": len(latencies),
        "errors": errors,
    }


def offline_ceiling(encoder, texts: list[str], seconds: float) -> dict:
    """encode() over 1024-sentence chunks, batch 64: the throughput no server can beat."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = [texts[(done + k) % len(texts)] for k in range(1024)]
        encoder.encode(chunk, batch_size=64, normalize=True)
        done += len(chunk)
    return {"sent_per_s": done / (time.perf_counter() - start)}


def bare_calls(encoder, requests: list[list[str]], per: int, seconds: float) -> dict:
    """One encode() per request, back to back: the latency floor at concurrency 1."""
    latencies, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        encoder.encode(requests[i % len(requests)], batch_size=64, normalize=True)
        latencies.append(time.perf_counter() - t0)
        i += 1
    return summary(latencies, per, time.perf_counter() - start)


def requests_of(texts: list[str], per: int) -> list[list[str]]:
    return [texts[i : i + per] for i in range(0, len(texts) - per + 1, per)]


def arguments() -> argparse.Namespace:
    p = benchlib.parser("serve", __doc__, "model", "data", "rounds", "seconds")
    # the server's own layout options, passed on to diffcse-serve (not the common --threads)
    positive = benchlib.positive_int
    p.add_argument("--threads", type=positive, help="threads per run (default: the server's)")
    p.add_argument("--workers", type=positive, help="runs at once (default: the server's)")
    p.add_argument("--max-batch-tokens", type=positive, help="for the batched server")
    p.add_argument("--shapes", default=",".join(SHAPES), help="subset of " + ",".join(SHAPES))
    p.add_argument(
        "--concurrency",
        type=benchlib.positive_ints,
        default=CONCURRENCY,
        help="client counts, comma-separated (default 1,8,64)",
    )
    p.add_argument("--infinity-venv", type=Path, help="venv with infinity-emb: add it")
    p.add_argument("--infinity-model", type=Path, help="HF folder with an onnx/ export")
    p.add_argument(
        "--client",
        choices=("httpx", "wrk"),
        default="httpx",
        help="load generator: httpx in this process (asyncio), or wrk (C; apt install wrk)",
    )
    args = p.parse_args()
    unknown = sorted(set(args.shapes.split(",")) - set(SHAPES))
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from {','.join(SHAPES)}")
    args.shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    if args.client == "wrk" and shutil.which("wrk") is None:
        raise benchlib.BenchSkip("--client wrk: wrk is not installed (apt-get install wrk)")
    args.model = models.given_or_exported(args.model)
    return args


def contenders(args: argparse.Namespace, texts: list[str]) -> tuple[dict, dict, dict]:
    """The servers to start, {name: diffcse-serve's extra options, or None for infinity-emb},
    with each one's request bodies per shape and the model name its requests carry."""
    servers = dict(SERVERS)
    if args.max_batch_tokens:
        servers["batched"] = ["--max-batch-tokens", str(args.max_batch_tokens)]
    bodies = {name: make_bodies(texts, "m") for name in SERVERS}
    model_names = dict.fromkeys(SERVERS, "m")
    if args.infinity_venv:
        servers["infinity"] = None
        bodies["infinity"] = make_bodies(texts, ".")
        model_names["infinity"] = "."
    return servers, bodies, model_names


def server_layout(args: argparse.Namespace) -> list[str]:
    """diffcse-serve's --threads/--workers as given (empty: the server's defaults)."""
    return [f"--{k}={v}" for k, v in (("threads", args.threads), ("workers", args.workers)) if v]


def start_servers(args, servers: dict, pooling: str, procs: dict) -> dict[str, str]:
    """Start every server on a free port (each process goes into `procs` at once, so the
    caller stops it whatever happens next); returns their base URLs."""
    urls = {}
    for name, extra in servers.items():
        port = free_port()
        if extra is None:
            procs[name] = start_infinity(args, port, pooling)
        else:
            procs[name] = start_server(args.model, port, server_layout(args), extra)
        urls[name] = f"http://127.0.0.1:{port}"
    return urls


def check_servers(args, urls, procs, model_names, bodies, texts, encoder, info) -> None:
    """Wait for each server, check its embeddings against `encoder` and warm it up. Ours must
    pass; a peer that fails is left out of `urls`, with the reason printed."""
    for name in list(urls):
        try:
            wait_ready(urls[name], procs[name], timeout=300)
            cosine = parity(urls[name], model_names[name], texts, encoder)
        except benchlib.BenchSkip as exc:
            if name in SERVERS:
                raise
            print(f"{name}: not measured ({exc})", flush=True)
            del urls[name]
            continue
        info[f"{name}_min_cosine_vs_encode"] = cosine
        warm = next(iter(args.shapes))  # --shapes may leave out 1-sentence
        asyncio.run(load(urls[name], bodies[name][warm], args.shapes[warm], 8, 1.0))


def main() -> None:
    from diffcse_runtime import Encoder

    args = arguments()
    texts = benchlib.stsb_dev_sentences(benchlib.sts_data_dir(args.data))
    servers, bodies, model_names = contenders(args, texts)
    cores = usable_cpus()
    extra = {"batched_max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {}
    info = benchlib.machine(
        cores,
        server_layout=" ".join(server_layout(args)) or "diffcse-serve's default",
        model=str(args.model),
        seconds=args.seconds,
        **extra,
        command=" ".join(sys.argv),
    )
    print(benchlib.describe(info), flush=True)
    # the ceiling: one Encoder with every core, as a batch job would run it
    encoder = Encoder(args.model, intra_op_threads=cores, spin=False)
    procs: dict[str, subprocess.Popen] = {}
    try:
        urls = start_servers(args, servers, encoder.meta.pooling, procs)
        check_servers(args, urls, procs, model_names, bodies, texts, encoder, info)
        pids = {name: proc.pid for name, proc in procs.items()}
        runs = measure(args, encoder, texts, bodies, urls, pids)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    report(args, info, runs)


def measure(args, encoder, texts, bodies, urls, pids) -> list[dict]:
    runs = []
    for rnd in range(args.rounds):
        ceiling = offline_ceiling(encoder, texts, args.seconds)
        runs.append({"round": rnd, "contender": "offline", "shape": "-", "c": "-", **ceiling})
        for s, (shape, per) in enumerate(args.shapes.items()):
            reqs = requests_of(texts, per)
            runs.append(
                {
                    "round": rnd,
                    "contender": "bare encode",
                    "shape": shape,
                    "c": 1,
                    **bare_calls(encoder, reqs, per, args.seconds),
                }
            )
            for k, conc in enumerate(args.concurrency):
                names = list(urls)
                shift = (rnd + s + k) % len(names)
                for name in names[shift:] + names[:shift]:
                    if args.client == "wrk":
                        r = wrk_load(
                            urls[name], bodies[name][shape], per, conc, args.seconds, pids[name]
                        )
                    else:
                        r = asyncio.run(
                            load(urls[name], bodies[name][shape], per, conc, args.seconds)
                        )
                    runs.append({"round": rnd, "contender": name, "shape": shape, "c": conc, **r})
                    print(
                        f"round {rnd} {shape:11s} c={conc:<3d} {name:9s} "
                        f"{r['sent_per_s']:8.1f} sent/s p50 {r['p50_ms']:7.2f} ms "
                        f"p99 {r['p99_ms']:7.2f} ms",
                        flush=True,
                    )
    return runs


def cell(runs, contender, shape, conc, key) -> list[float]:
    return [
        r[key]
        for r in runs
        if r["contender"] == contender and r["shape"] == shape and r["c"] == conc
    ]


def row_of(runs, shape: str, conc: int, names: list[str], ceiling: dict) -> dict:
    """Medians over rounds of one (request shape, concurrency) cell; ratios paired by round."""
    med = benchlib.median
    by = {
        n: {r["round"]: r for r in runs if (r["contender"], r["shape"], r["c"]) == (n, shape, conc)}
        for n in names
    }
    bare = {r["round"]: r for r in runs if (r["contender"], r["shape"]) == ("bare encode", shape)}
    rounds = sorted(by["batched"])
    row = {"request": shape, "c": conc}
    for n in names:
        row[f"{n} sent/s"] = med([by[n][i]["sent_per_s"] for i in rounds])
    for n in names[1:]:
        row[f"batched/{n}"] = med(
            [by["batched"][i]["sent_per_s"] / by[n][i]["sent_per_s"] for i in rounds]
        )
    row["batched/offline"] = med([by["batched"][i]["sent_per_s"] / ceiling[i] for i in rounds])
    for n in names:
        row[f"{n} p50 ms"] = med([by[n][i]["p50_ms"] for i in rounds])
        row[f"{n} p99 ms"] = med([by[n][i]["p99_ms"] for i in rounds])
    row["bare p99 ms"] = med([bare[i]["p99_ms"] for i in rounds]) if conc == 1 else None
    row["p99 - bare ms"] = (
        med([by["batched"][i]["p99_ms"] - bare[i]["p99_ms"] for i in rounds]) if conc == 1 else None
    )
    return row


def report(args, info, runs) -> None:
    med = benchlib.median
    ceiling = {r["round"]: r["sent_per_s"] for r in runs if r["contender"] == "offline"}
    names = list(dict.fromkeys(r["contender"] for r in runs if isinstance(r["c"], int)))
    names.remove("bare encode")
    rows = []
    for shape in args.shapes:
        for conc in args.concurrency:
            rows.append(row_of(runs, shape, conc, names, ceiling))
    info = benchlib.finish_machine(info)
    offline = med(list(ceiling.values()))
    cells = {(r["request"], r["c"]): r for r in rows}
    one, first = cells.get(("1-sentence", 64)), cells.get(("1-sentence", 1))
    goals = {}  # judged only where their cells were measured (--shapes/--concurrency subsets)
    if one:
        goals["c64 1-sentence >= 0.70 x offline"] = (
            one["batched/offline"],
            one["batched/offline"] >= 0.7,
        )
        goals["c64 1-sentence >= 3x unbatched"] = (
            one["batched/unbatched"],
            one["batched/unbatched"] >= 3,
        )
    if first:
        goals["c1 p99 within 2 ms of bare encode"] = (
            first["p99 - bare ms"],
            first["p99 - bare ms"] <= 2,
        )
    columns = list(rows[0])
    text = [
        benchlib.describe(info),
        f"# load at end {info['loadavg_at_end']}",
        f"offline ceiling (encode, batch 64): {offline:,.0f} sentences/s (median)",
        benchlib.table(rows, columns),
    ]
    text += [f"goal {k}: {v:.2f} -> {'met' if ok else 'MISSED'}" for k, (v, ok) in goals.items()]
    print("\n".join(text[2:]))
    benchlib.write_json(
        args.out,
        {
            "machine": info,
            "rows": rows,
            "offline_sent_per_s": offline,
            "goals": goals,
            "runs": runs,
        },
    )
    args.out.with_suffix(".txt").write_text("\n".join(text) + "\n", encoding="utf-8")


if __name__ == "__main__":
    benchlib.run_main(main)

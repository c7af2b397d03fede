"""Serving layouts A/B: workers x threads per worker (and the unbatched server on every core),
each in a fresh diffcse-serve, interleaved rounds of wrk load with 1-sentence requests.

    python -m benchmarks.serve_layout [--model DIR] [--rounds 3] [--concurrency 64]
        [--layouts 1x2,2x1]     # WORKERSxTHREADS; default: the 2-core A/B of README
"""

from __future__ import annotations

import shutil
import statistics
import sys

from benchmarks import benchlib, models, serve
from diffcse_runtime.parallel import usable_cpus


def layouts_of(spec: str, cores: int) -> dict[str, list[str]]:
    """'1x2,2x1' -> {name: diffcse-serve options}, plus the unbatched server on every core."""
    out = {}
    for item in spec.split(","):
        workers, threads = (int(x) for x in item.split("x"))
        name = f"{workers} worker{'s' * (workers > 1)} x {threads} thread{'s' * (threads > 1)}"
        out[name] = ["--threads", str(threads), "--workers", str(workers)]
    out[f"unbatched, 1 x {cores}"] = ["--threads", str(cores), "--workers", "1", "--no-batching"]
    return out


def main() -> None:
    p = benchlib.parser("serve_layout", __doc__, "model", "data", "rounds", "seconds", seconds=6.0)
    p.add_argument("--concurrency", type=benchlib.positive_int, default=64)
    p.add_argument("--layouts", default="1x2,2x1", help="WORKERSxTHREADS, comma-separated")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise benchlib.BenchSkip("wrk is not installed (apt-get install wrk)")
    args.model = models.given_or_exported(args.model)
    texts = benchlib.stsb_dev_sentences(benchlib.sts_data_dir(args.data))
    bodies = serve.make_bodies(texts, "m")["1-sentence"]
    cores = usable_cpus()
    layouts = layouts_of(args.layouts, cores)
    info = benchlib.machine(cores, model=str(args.model), command=" ".join(sys.argv))
    print(benchlib.describe(info), flush=True)
    results: dict[str, list[dict]] = {name: [] for name in layouts}
    names = list(layouts)
    for rnd in range(args.rounds):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            port = serve.free_port()
            proc = serve.start_server(args.model, port, layouts[name], [])
            url = f"http://127.0.0.1:{port}"
            try:
                serve.wait_ready(url, proc)
                serve.wrk_load(url, bodies, 1, 8, 1)  # warm up
                alone = serve.wrk_load(url, bodies, 1, 1, args.seconds / 2)  # a lone client
                r = serve.wrk_load(url, bodies, 1, args.concurrency, args.seconds)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            r["c1_p50_ms"], r["c1_p99_ms"] = alone["p50_ms"], alone["p99_ms"]
            results[name].append(r)
            print(
                f"round {rnd} {name:24s} {r['sent_per_s']:7.1f} sent/s p99 {r['p99_ms']:.1f} ms"
                f" | c=1 p50 {alone['p50_ms']:.2f} p99 {alone['p99_ms']:.2f} ms",
                flush=True,
            )
    med = statistics.median
    rows = [
        {
            "layout": n,
            f"c={args.concurrency} sent/s": med([r["sent_per_s"] for r in v]),
            f"c={args.concurrency} p99 ms": med([r["p99_ms"] for r in v]),
            "c=1 p50 ms": med([r["c1_p50_ms"] for r in v]),
            "c=1 p99 ms": med([r["c1_p99_ms"] for r in v]),
            "rounds": len(v),
        }
        for n, v in results.items()
    ]
    print(benchlib.table(rows, list(rows[0])))
    benchlib.write_json(
        args.out, {"machine": benchlib.finish_machine(info), "rows": rows, "runs": results}
    )


if __name__ == "__main__":
    benchlib.run_main(main)

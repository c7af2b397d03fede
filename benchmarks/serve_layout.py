"""Serving layouts A/B: one 2-thread worker vs two 1-thread workers (and the unbatched server),
each in a fresh diffcse-serve, interleaved rounds of wrk load with 1-sentence requests.

    python benchmarks/serve_layout.py [--model DIR] [--rounds 3] [--concurrency 64]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import benchlib
import serve

LAYOUTS = {
    "1 worker x 2 threads": ["--threads", "2", "--workers", "1"],
    "2 workers x 1 thread": ["--threads", "1", "--workers", "2"],
    "unbatched, 1 x 2": ["--threads", "2", "--workers", "1", "--no-batching"],
}


def main() -> None:
    p = benchlib.parser("serve_layout", __doc__)
    p.add_argument("--model", type=Path, default=benchlib.ROOT / "runs" / "demo_cpu" / "model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=6.0)
    args = p.parse_args()
    texts = benchlib.stsb_dev_sentences(benchlib.sts_data_dir(None))
    bodies = serve.make_bodies(texts, "m")["1-sentence"]
    info = benchlib.machine(2, model=str(args.model), command=" ".join(sys.argv))
    print(benchlib.describe(info), flush=True)
    results: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    names = list(LAYOUTS)
    for rnd in range(args.rounds):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            port = serve.free_port()
            proc = serve.start_server(args.model, port, LAYOUTS[name], [])
            url = f"http://127.0.0.1:{port}"
            try:
                serve.wait_ready(url, proc)
                serve.wrk_load(url, bodies, 1, 8, 1)  # warm up
                r = serve.wrk_load(url, bodies, 1, args.concurrency, args.seconds)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            results[name].append(r["sent_per_s"])
            print(f"round {rnd} {name:22s} {r['sent_per_s']:7.1f} sent/s p99 {r['p99_ms']:.1f} ms")
    rows = [
        {"layout": n, "median sent/s": statistics.median(v), "rounds": len(v)}
        for n, v in results.items()
    ]
    print(benchlib.table(rows, ["layout", "median sent/s", "rounds"]))
    benchlib.write_json(
        args.out, {"machine": benchlib.finish_machine(info), "rows": rows, "runs": results}
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    benchlib.run_main(main)

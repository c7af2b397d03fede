"""How diffcse-serve cuts a batch into onnxruntime runs: the run plan vs the old half-fill rule
vs offline `encode`, in sentences/s of session time (no HTTP).

Batches of B random STS-B dev sentences (the same batches for every contender), each sorted
by length and cut into runs either by `plan_runs` (serve/run_plan.py: exact DP over padding
plus the per-run price `measure_overhead` finds) or by the rule it replaced (a text joins
the run only if it is at least half as long as the run's first text, MIN_FILL = 0.5).
Offline is `encode(768 sentences, batch_size=64)`, the ceiling `serve.py` quotes. Contenders
are interleaved, rounds rotate their order, and the table holds medians over rounds.

    python -m benchmarks.run_plan [--threads 2] [--rounds 5] [--sizes 8,24,32,64]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks import benchlib, models

MIN_FILL = 0.5


def half_fill(lengths: list[int]) -> list[tuple[int, int]]:
    """The rule plan_runs replaced: cut where a text is shorter than half the run's width."""
    plan, start = [], 0
    while start < len(lengths):
        stop = start + 1
        while stop < len(lengths) and lengths[stop] >= MIN_FILL * lengths[start]:
            stop += 1
        plan.append((start, stop))
        start = stop
    return plan


@dataclass
class Bench:
    """The encoder, the texts' token lengths and the batches every contender encodes."""

    enc: Any
    length: dict[str, int]
    batches: dict[int, list[list[str]]]
    chunk: list[str]  # offline: one encode() of these at batch 64
    planners: dict[str, Callable[[list[int]], list[tuple[int, int]]]]

    def cell(self, size: int | None, planner: str | None) -> dict:
        """Encode every batch of `size` cut by `planner` (None: the offline chunk)."""
        began, done, runs, padded, real = time.perf_counter(), 0, 0, 0, 0
        if size is None:
            self.enc.encode(self.chunk, batch_size=64, normalize=True)
            done = len(self.chunk)
        for batch in self.batches.get(size, []):
            order = sorted(batch, key=lambda t: -self.length[t])
            lengths = [self.length[t] for t in order]
            for start, stop in self.planners[planner](lengths):
                self.enc.encode(order[start:stop], batch_size=stop - start, normalize=True)
                runs += 1
                padded += (stop - start) * lengths[start]
            done, real = done + size, real + sum(lengths)
        return {
            "sent_per_s": done / (time.perf_counter() - began),
            "texts_per_run": done / runs if runs else None,
            "padded_per_real": padded / real if real else None,
        }


def setup(args: argparse.Namespace, texts: list[str]) -> tuple[Bench, float]:
    """The bench and the run price measure_overhead finds for this model and threads."""
    from diffcse_runtime import Encoder
    from diffcse_runtime.serve.run_plan import measure_overhead, plan_runs

    enc = Encoder(args.model, intra_op_threads=args.threads, spin=False)
    length = {t: len(e.ids) for t, e in zip(texts, enc.tokenizer.encode_batch(texts), strict=True)}
    overhead = measure_overhead(enc, normalize=True)
    batches = {
        b: [random.Random(b * 1000 + k).sample(texts, b) for k in range(max(8, 768 // b))]
        for b in args.sizes
    }
    planners = {"half-fill": half_fill, "run plan": lambda ls: plan_runs(ls, 8192, overhead)}
    bench = Bench(enc, length, batches, random.Random(1).sample(texts, 768), planners)
    return bench, overhead


def table_rows(results: dict[str, list[dict]]) -> list[dict]:
    """Medians over rounds, each contender against offline."""
    med = benchlib.median
    offline = med([r["sent_per_s"] for r in results["offline"]])
    rows = []
    for name, runs in results.items():
        row = {"contender": name, "sent/s": med([r["sent_per_s"] for r in runs])}
        row["x offline"] = row["sent/s"] / offline
        for key in ("texts_per_run", "padded_per_real"):
            row[key.replace("_", " ")] = runs[0][key]
        rows.append(row)
    return rows


def main() -> None:
    p = benchlib.parser(
        "run_plan", __doc__, "model", "data", "threads", "rounds", threads=2, rounds=5
    )
    p.add_argument("--sizes", type=benchlib.positive_ints, default=[8, 24, 32, 64])
    args = p.parse_args()
    args.model = models.given_or_exported(args.model)
    texts = benchlib.stsb_dev_sentences(benchlib.sts_data_dir(args.data))
    bench, overhead = setup(args, texts)
    info = benchlib.machine(args.threads, model=str(args.model), command=" ".join(sys.argv))
    info["run_overhead_tokens"] = round(overhead, 1)
    print(benchlib.describe(info), f"| measured run price {overhead:.1f} tokens", flush=True)
    cells = [("offline", None, None)]
    cells += [(f"B={b} {name}", b, name) for b in args.sizes for name in bench.planners]
    results: dict[str, list[dict]] = {c[0]: [] for c in cells}
    for rnd in range(args.rounds):
        shift = rnd % len(cells)
        for name, size, planner in cells[shift:] + cells[:shift]:
            results[name].append(bench.cell(size, planner))
    rows = table_rows(results)
    print(benchlib.table(rows, list(rows[0])))
    info = benchlib.finish_machine(info)
    benchlib.write_json(args.out, {"machine": info, "rows": rows, "runs": results})


if __name__ == "__main__":
    benchlib.run_main(main)

"""How a batch of texts is cut into onnxruntime runs: the fewest padded tokens plus run costs.

A run costs about `overhead + rows * width` token-times: every run pays a fixed price (the
session call, waking the intra-op threads, tokenizing, normalizing), and every row is padded
to the run's longest text. One run per batch pays for padding (a 60-token text makes 23
short ones cost 60 tokens each); one run per length pays the fixed price over and over.
`plan_runs` finds the cheapest split of the length-sorted batch exactly, by dynamic
programming, and `measure_overhead` prices the fixed part for the served model and threads
once, at start-up, because it differs by model size and thread count (19-27 tokens for
MiniLM-L6 on 2 threads: benchmarks/notes/serving.md).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from diffcse_runtime.encoder import Encoder

DEFAULT_OVERHEAD_TOKENS = 16.0  # used when a measurement is unusable (noise, a tiny model)
PROBE_WORDS = 14  # a probe text of ~16 tokens, a typical sentence
PROBE_ROWS = 16
PROBE_REPEATS = 5


def plan_runs(lengths: list[int], budget: int, overhead: float) -> list[tuple[int, int]]:
    """Runs as (start, stop) slices of `lengths`, which must be sorted longest first.

    Minimises the sum over runs of `overhead + rows * width` (width: the run's first, longest
    length), with no run over `budget` padded tokens unless it is a single text. Exact, by
    dynamic programming from the end: `best[i]` is the cheapest plan of texts i.. and the
    run starting at i may take any number of rows that fits the budget. One numpy step per
    text (~0.4 ms for a 32-text batch, ~12 ms for 2048 texts).
    """
    n = len(lengths)
    best = np.zeros(n + 1)
    stop_at = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        width = max(1, lengths[i])
        fit = max(1, min(n - i, budget // width))
        rows = np.arange(1, fit + 1)
        costs = overhead + rows * width + best[i + 1 : i + fit + 1]
        k = fit - 1 - int(np.argmin(costs[::-1]))  # on a tie, the longer run
        best[i], stop_at[i] = costs[k], i + k + 1
    plan, i = [], 0
    while i < n:
        plan.append((i, int(stop_at[i])))
        i = int(stop_at[i])
    return plan


def measure_overhead(encoder: Encoder, normalize: bool) -> float:
    """The fixed cost of one session run on `encoder` (what a server worker does: the ids
    come tokenized with the request), in token-times of its own model.

    Times one probe text alone and PROBE_ROWS copies of it (medians of PROBE_REPEATS after a
    warm-up call): the per-token price is the slope, the fixed price what is left of the
    single-text time. Takes ~0.2 s for MiniLM-L6 on 2 cores.
    """
    text = " ".join(["word"] * PROBE_WORDS)
    tokens = len(encoder.tokenizer.encode(text).ids)

    def timed(texts: list[str]) -> float:
        ids, _ = encoder.tokenize(texts)
        encoder.encode_token_ids(ids, normalize=normalize)  # warm-up
        times = []
        for _ in range(PROBE_REPEATS):
            began = time.perf_counter()
            encoder.encode_token_ids(ids, normalize=normalize)
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    one, many = timed([text]), timed([text] * PROBE_ROWS)
    per_token = (many - one) / ((PROBE_ROWS - 1) * tokens)
    if per_token <= 0:
        return DEFAULT_OVERHEAD_TOKENS
    overhead = one / per_token - tokens
    return min(max(overhead, 0.0), float(4 * encoder.max_seq_length))

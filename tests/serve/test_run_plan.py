"""How the server cuts a length-sorted batch into onnxruntime runs (serve/run_plan.py)."""

from __future__ import annotations

import functools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from diffcse_runtime import Encoder
from diffcse_runtime.serve.run_plan import measure_overhead, plan_runs


def cost(lengths: list[int], plan: list[tuple[int, int]], overhead: float) -> float:
    """What the plan really costs: each run pads to its own longest (first) text."""
    return sum(overhead + (stop - start) * lengths[start] for start, stop in plan)


def best_cost(lengths: list[int], budget: int, overhead: float) -> float:
    """Brute force over every split into contiguous runs that fit the budget."""

    @functools.cache
    def best(start: int) -> float:
        if start == len(lengths):
            return 0.0
        options = []
        for stop in range(start + 1, len(lengths) + 1):
            rows = stop - start
            if rows > 1 and rows * lengths[start] > budget:
                break
            options.append(overhead + rows * lengths[start] + best(stop))
        return min(options)

    return best(0)


def check_shape(lengths: list[int], plan: list[tuple[int, int]], budget: int) -> None:
    assert [s for s, _ in plan] == [0] + [e for _, e in plan[:-1]]  # contiguous, in order
    assert plan[-1][1] == len(lengths)
    for start, stop in plan:
        assert stop > start
        assert stop - start == 1 or (stop - start) * lengths[start] <= budget


lengths_st = st.lists(st.integers(1, 64), max_size=12).map(lambda xs: sorted(xs, reverse=True))


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_st, overhead=st.floats(0, 80), budget=st.integers(1, 400))
def test_the_plan_is_the_cheapest_split(lengths, overhead, budget):
    plan = plan_runs(lengths, budget, overhead)
    if not lengths:
        assert plan == []
        return
    check_shape(lengths, plan, budget)
    assert cost(lengths, plan, overhead) <= best_cost(lengths, budget, overhead) + 1e-9


def test_the_two_extremes_and_a_typical_batch():
    lengths = [40, 20, 20, 12, 12, 12, 11, 9, 9, 8]
    # free runs: no padding at all
    assert cost(lengths, plan_runs(lengths, 8192, 0.0), 0.0) == sum(lengths)
    # very dear runs: one run, everything padded to 40
    assert plan_runs(lengths, 8192, 1e6) == [(0, len(lengths))]
    # MiniLM on 2 threads (~19 tokens a run): the 40 alone, the 20s, then the rest in one
    assert plan_runs(lengths, 8192, 19.0) == [(0, 1), (1, 3), (3, 10)]


def test_the_budget_splits_a_long_group():
    lengths = [32] * 10
    plan = plan_runs(lengths, 100, 1e6)  # 3 rows of 32 fit in 100 tokens
    assert plan == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert plan_runs([500, 4], 100, 0.0) == [(0, 1), (1, 2)]  # one text over the budget alone
    assert plan_runs([], 100, 5.0) == []


def test_measured_overhead_is_a_price_in_tokens(tiny_model_dir):
    encoder = Encoder(tiny_model_dir, intra_op_threads=1)
    overhead = measure_overhead(encoder, normalize=True)
    assert math.isfinite(overhead)
    assert 0.0 <= overhead <= 4 * encoder.max_seq_length


def test_the_batcher_prices_runs_at_start_unless_told(tiny_model_dir):
    import asyncio

    from diffcse_runtime.serve.batching import Batcher, BatchSettings
    from diffcse_runtime.serve.metrics import ServeMetrics

    encoder = Encoder(tiny_model_dir, intra_op_threads=1)

    async def started(settings: BatchSettings) -> float | None:
        batcher = Batcher("m", encoder, settings, ServeMetrics())
        await batcher.start()
        rows = await batcher.embed(encoder.tokenize(["a b c", "a"])[0])
        await batcher.stop()
        assert rows.shape == (2, encoder.embedding_dim)
        return batcher.run_overhead

    measured = asyncio.run(started(BatchSettings()))
    assert measured is not None and 0.0 <= measured <= 4 * encoder.max_seq_length
    assert asyncio.run(started(BatchSettings(run_overhead_tokens=7.5))) == 7.5


def test_idle_workers_share_the_waiting_requests(tiny_model_dir):
    """Four lone requests and four idle workers: four runs of one text, not one of four;
    one worker: one merged run."""
    import asyncio

    from diffcse_runtime.serve.batching import Batcher, BatchSettings
    from diffcse_runtime.serve.metrics import ServeMetrics

    encoder = Encoder(tiny_model_dir, intra_op_threads=1)

    async def runs(workers: int) -> list[float]:
        metrics = ServeMetrics()
        settings = BatchSettings(workers=workers, run_overhead_tokens=1000.0)
        batcher = Batcher("m", encoder, settings, metrics)
        await batcher.start()
        ids, _ = encoder.tokenize(["a b c d"])
        rows = await asyncio.gather(*(batcher.embed(ids) for _ in range(4)))
        await batcher.stop()
        assert all(r.shape == (1, encoder.embedding_dim) for r in rows)
        sample = metrics.registry.get_sample_value
        labels = {"model": "m"}
        return [
            sample("diffcse_batch_size_sum", labels),
            sample("diffcse_batch_size_count", labels),
        ]

    assert asyncio.run(runs(4)) == [4.0, 4]  # 4 texts in 4 runs
    assert asyncio.run(runs(1)) == [4.0, 1]  # 4 texts in 1 run

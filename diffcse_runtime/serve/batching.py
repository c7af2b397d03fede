"""Dynamic batching: concurrent requests share onnxruntime session runs.

One `Batcher` per served model. Requests put their texts in a bounded queue; a scheduler
task on the event loop hands a batch to a worker thread whenever one is free, so the loop
never blocks on onnxruntime and texts that arrive while the workers are busy are merged into
the next run (continuous batching: no added latency when the server is idle).

A batch is filled round-robin over the waiting requests in arrival order, each taking at
most a quantum of tokens per round (deficit round-robin). Small requests therefore finish
in the next run even behind a 2048-text request, while a request alone still gets whole
batches. The worker sorts the batch by token length and cuts it into the runs that cost
least (`run_plan`: padding against the fixed price of a run, measured at start-up), none
over `max_batch_tokens` padded tokens. Each request gets exactly its own rows back, in its
input order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from diffcse_runtime.encoder import Encoder
from diffcse_runtime.serve.metrics import ServeMetrics
from diffcse_runtime.serve.run_plan import measure_overhead, plan_runs

log = logging.getLogger("diffcse_runtime.serve")

QUANTUM_SHARE = 4  # a request takes at most max_batch_tokens / 4 tokens per round


class QueueFull(Exception):
    """The queue holds `max_queue` texts already: the caller answers 503 + Retry-After."""


@dataclass
class BatchSettings:
    """How requests are merged. `merge=False` runs each request alone (the unbatched mode)."""

    max_batch_tokens: int = 8192
    max_wait_s: float = 0.0
    max_queue: int = 8192
    workers: int = 1
    normalize: bool = True
    merge: bool = True
    # the fixed price of a run in token-times (run_plan); None: measured at start-up
    run_overhead_tokens: float | None = None


@dataclass(eq=False)
class _Job:
    """One request's texts on their way through the queue."""

    ids: list[list[int]]  # token ids per text, as the model reads them (tokenized once)
    lengths: list[int]  # tokens the model reads per text
    future: asyncio.Future
    out: np.ndarray
    order: list[int] = field(default_factory=list)  # longest first
    next: int = 0  # position in `order` of the first text not yet handed to a worker
    left: int = 0  # rows not yet computed
    enqueued: float = 0.0

    @property
    def waiting(self) -> int:
        return len(self.order) - self.next


class Batcher:
    """Queue, scheduler and worker threads of one model; start() and stop() on the loop."""

    def __init__(
        self, name: str, encoder: Encoder, settings: BatchSettings, metrics: ServeMetrics
    ) -> None:
        self.name = name
        self.encoder = encoder
        self.settings = settings
        self.metrics = metrics
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # texts waiting for a worker
        self._idle = settings.workers
        self._wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._scheduler: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self.run_overhead = settings.run_overhead_tokens

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._wake = asyncio.Event()  # bound to the running loop
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.workers, thread_name_prefix=f"diffcse-{self.name}"
        )
        if self.run_overhead is None:  # on a worker thread: the runs it prices run there
            loop = asyncio.get_running_loop()
            self.run_overhead = await loop.run_in_executor(
                self._executor, measure_overhead, self.encoder, self.settings.normalize
            )
            log.info('{"model":"%s","run_overhead_tokens":%.1f}', self.name, self.run_overhead)
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule())

    async def stop(self) -> None:
        """Finish the batches already running, then release the threads."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ------------------------------------------------------------ requests

    async def embed(self, ids: list[list[int]]) -> np.ndarray:
        """(n, d) float32 rows for token ids from `Encoder.tokenize` (the request's one
        tokenization: workers never tokenize); raises QueueFull instead of queueing past the
        bound."""
        n = len(ids)
        lengths = [len(row) for row in ids]
        if self._queued + n > self.settings.max_queue:
            self.metrics.rejected.labels(self.name).inc()
            raise QueueFull(f"{self._queued} texts are waiting for model {self.name!r}")
        loop = asyncio.get_running_loop()
        job = _Job(
            ids=ids,
            lengths=lengths,
            future=loop.create_future(),
            out=np.empty((n, self.encoder.embedding_dim), dtype=np.float32),
            order=sorted(range(n), key=lambda i: -lengths[i]),
            left=n,
            enqueued=time.monotonic(),
        )
        self._jobs.append(job)
        self._set_queued(self._queued + n)
        self._wake.set()
        try:
            return await job.future
        finally:
            if not job.future.done() or job.future.cancelled():
                self._drop(job)  # the client went away: its waiting texts leave the queue

    def _drop(self, job: _Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
            self._set_queued(self._queued - job.waiting)
            job.next = len(job.order)

    def _set_queued(self, value: int) -> None:
        self._queued = value
        self.metrics.queue_depth.labels(self.name).set(value)

    # ------------------------------------------------------------ scheduling

    async def _schedule(self) -> None:
        """Hand a batch to each free worker; optionally wait `max_wait_s` for one to fill."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._jobs and self._idle > 0:
                delay = self._fill_delay()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    self._wake.clear()
                    continue
                batch = self._take_batch(self._share())
                self._idle -= 1
                task = asyncio.get_running_loop().create_task(self._run(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    def _fill_delay(self) -> float:
        """Seconds a free worker should still wait for the batch to fill (0: run now)."""
        wait = self.settings.max_wait_s
        if wait <= 0:
            return 0.0
        if self._waiting_tokens() >= self.settings.max_batch_tokens:
            return 0.0
        return max(0.0, self._jobs[0].enqueued + wait - time.monotonic())

    def _waiting_tokens(self) -> int:
        return sum(sum(j.lengths[i] for i in j.order[j.next :]) for j in self._jobs)

    def _share(self) -> int:
        """Tokens for the next batch: what waits, up to max_batch_tokens, for the last idle
        worker; with several idle, an equal share each. Without the share, 8 lone requests
        on 8 idle workers went to one worker as one batch while 7 sat idle (16 cores, c=8:
        0.70x the unbatched server; benchmarks/notes/serving.md)."""
        budget = self.settings.max_batch_tokens
        if self._idle > 1 and self.settings.merge:
            budget = min(budget, -(-self._waiting_tokens() // self._idle))
        return max(1, budget)

    def _take_batch(self, budget: int) -> list[tuple[_Job, int]]:
        """Up to `budget` real tokens, round-robin over requests in arrival order."""
        jobs = list(self._jobs) if self.settings.merge else [self._jobs[0]]
        quantum = max(1, budget // QUANTUM_SHARE) if len(jobs) > 1 else budget
        picked: list[tuple[_Job, int]] = []
        used = 0
        full = False
        while not full and any(j.waiting for j in jobs):
            for job in jobs:
                share = 0
                while job.waiting:
                    n = job.lengths[job.order[job.next]]
                    if picked and used + n > budget:
                        full = True
                        break
                    if share and share + n > quantum:
                        break
                    picked.append((job, job.order[job.next]))
                    job.next += 1
                    used += n
                    share += n
                if full:
                    break
        for job in jobs:
            if not job.waiting:
                self._jobs.remove(job)
        self._set_queued(self._queued - len(picked))
        return picked

    async def _run(self, batch: list[tuple[_Job, int]]) -> None:
        """Compute a batch on a worker thread. Each run's rows reach their requests as soon
        as that run ends, so a request never waits for the rest of its batch."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._compute, batch, loop)
        except Exception as exc:  # onnxruntime failure: the requests not yet answered fail
            for job, _ in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
        finally:
            self._idle += 1
            self._wake.set()

    def _deliver(self, part: list[tuple[_Job, int]], rows: np.ndarray) -> None:
        """On the loop: copy a run's rows to their requests; answer the completed ones."""
        for (job, i), row in zip(part, rows, strict=True):
            job.out[i] = row
            job.left -= 1
            if job.left == 0 and not job.future.done():
                job.future.set_result(job.out)

    def _compute(self, batch: list[tuple[_Job, int]], loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: the batch sorted by length and cut into the cheapest runs
        (`plan_runs`); each run's rows are handed to the loop as soon as it ends."""
        budget = self.settings.max_batch_tokens
        order = sorted(batch, key=lambda item: -item[0].lengths[item[1]])
        lengths = [job.lengths[i] for job, i in order]
        for start, stop in plan_runs(lengths, budget, self.run_overhead or 0.0):
            part = order[start:stop]
            began = time.perf_counter()
            rows = self.encoder.encode_token_ids(
                [job.ids[i] for job, i in part], normalize=self.settings.normalize
            )
            self.metrics.batch_seconds.labels(self.name).observe(time.perf_counter() - began)
            width = max(1, lengths[start])
            self._observe(len(part), len(part) * width, len({id(job) for job, _ in part}))
            loop.call_soon_threadsafe(self._deliver, part, rows)

    def _observe(self, size: int, tokens: int, requests: int) -> None:
        self.metrics.batch_size.labels(self.name).observe(size)
        self.metrics.batch_tokens.labels(self.name).observe(tokens)
        self.metrics.batch_requests.labels(self.name).observe(requests)

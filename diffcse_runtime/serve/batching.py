"""Dynamic batching: concurrent requests share onnxruntime session runs.

One `Batcher` per served model. Requests put their texts in a bounded queue; a scheduler
task on the event loop hands a batch to a worker thread whenever one is free, so the loop
never blocks on onnxruntime and texts that arrive while the workers are busy are merged into
the next run (continuous batching: no added latency when the server is idle).

A batch is filled round-robin over the waiting requests in arrival order, each taking at
most a quantum of tokens per round (deficit round-robin). Small requests therefore finish
in the next run even behind a 2048-text request, while a request alone still gets whole
batches. The worker sorts the batch by token length and cuts it into runs of at most
`max_batch_tokens` padded tokens, so a short sentence never pays for a long one's padding.
Each request gets exactly its own rows back, in its input order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from diffcse_runtime.encoder import Encoder
from diffcse_runtime.serve.metrics import ServeMetrics

QUANTUM_SHARE = 4  # a request takes at most max_batch_tokens / 4 tokens per round
# A text joins a run only if it fills at least half of the run's width. Measured on a busy
# 2-core machine (benchmarks/README.md, "Serving"): merged runs of 2-3 texts of random
# lengths cost 24 ms per text against 15 ms alone, the padding outweighing the per-run
# saving; with this cut, a run never spends more than half of a text's tokens on padding.
MIN_FILL = 0.5


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


@dataclass(eq=False)
class _Job:
    """One request's texts on their way through the queue."""

    texts: list[str]
    lengths: list[int]  # tokens the model reads per text (after truncation)
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

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._wake = asyncio.Event()  # bound to the running loop
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.workers, thread_name_prefix=f"diffcse-{self.name}"
        )
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

    async def embed(self, texts: list[str], lengths: list[int]) -> np.ndarray:
        """(n, d) float32 rows for `texts`; raises QueueFull instead of queueing past the bound."""
        if self._queued + len(texts) > self.settings.max_queue:
            self.metrics.rejected.labels(self.name).inc()
            raise QueueFull(f"{self._queued} texts are waiting for model {self.name!r}")
        loop = asyncio.get_running_loop()
        job = _Job(
            texts=texts,
            lengths=lengths,
            future=loop.create_future(),
            out=np.empty((len(texts), self.encoder.embedding_dim), dtype=np.float32),
            order=sorted(range(len(texts)), key=lambda i: -lengths[i]),
            left=len(texts),
            enqueued=time.monotonic(),
        )
        self._jobs.append(job)
        self._set_queued(self._queued + len(texts))
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
                batch = self._take_batch()
                self._idle -= 1
                task = asyncio.get_running_loop().create_task(self._run(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    def _fill_delay(self) -> float:
        """Seconds a free worker should still wait for the batch to fill (0: run now)."""
        wait = self.settings.max_wait_s
        if wait <= 0:
            return 0.0
        tokens = sum(sum(j.lengths[i] for i in j.order[j.next :]) for j in self._jobs)
        if tokens >= self.settings.max_batch_tokens:
            return 0.0
        return max(0.0, self._jobs[0].enqueued + wait - time.monotonic())

    def _take_batch(self) -> list[tuple[_Job, int]]:
        """Up to max_batch_tokens real tokens, round-robin over requests in arrival order."""
        budget = self.settings.max_batch_tokens
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
        """Worker thread: length-sorted runs of at most max_batch_tokens padded tokens, each
        text at least MIN_FILL of its run's width; each run is handed to the loop at once."""
        budget = self.settings.max_batch_tokens
        lengths = [job.lengths[i] for job, i in batch]
        order = sorted(range(len(batch)), key=lambda k: -lengths[k])
        start = 0
        while start < len(order):
            width = max(1, lengths[order[start]])
            stop, limit = start + 1, min(len(order), start + max(1, budget // width))
            while stop < limit and lengths[order[stop]] >= MIN_FILL * width:
                stop += 1
            part = [batch[k] for k in order[start:stop]]
            began = time.perf_counter()
            # return_token_counts: the server reports truncation per response and in
            # /metrics, so the encoder's own WARNING per call is not wanted here
            rows, _ = self.encoder.encode(
                [job.texts[i] for job, i in part],
                batch_size=len(part),
                normalize=self.settings.normalize,
                return_token_counts=True,
            )
            self.metrics.batch_seconds.labels(self.name).observe(time.perf_counter() - began)
            self._observe(len(part), len(part) * width, len({id(job) for job, _ in part}))
            loop.call_soon_threadsafe(self._deliver, part, rows)
            start = stop

    def _observe(self, size: int, tokens: int, requests: int) -> None:
        self.metrics.batch_size.labels(self.name).observe(size)
        self.metrics.batch_tokens.labels(self.name).observe(tokens)
        self.metrics.batch_requests.labels(self.name).observe(requests)

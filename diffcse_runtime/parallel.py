"""Embed on every core of one machine: N worker processes, each with its own session.

onnxruntime parallelises one batch over intra-op threads, and for the small matrices of a
sentence encoder a second thread measured 1.5x, not 2x; the threads meet at every operator.
Separate processes, each with one session and its own share of the cores, encode
independent chunks instead and never wait for one another (benchmarks/notes/runtime.md
has the figures behind `default_layout`).

Chunks go to the workers through a `ProcessPoolExecutor` with at most two chunks in flight
per worker, so reading a file of any size stays bounded in memory, and results come back in
input order. Workers are started with "spawn": forking a parent whose onnxruntime and
tokenizers thread pools already run is unsafe. Like any spawn-based pool, a script that uses
this needs the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from diffcse_runtime.encoder import EMBED_CHUNK_SIZE, Encoder
from diffcse_runtime.inputs import iter_text_chunks
from diffcse_runtime.model_dir import load_metadata
from diffcse_runtime.openvino_backend import check_backend
from diffcse_runtime.signals import signals_deferred
from diffcse_runtime.truncation import TokenCounts, TruncationTally

log = logging.getLogger("diffcse_runtime")
IN_FLIGHT_PER_WORKER = 2  # one chunk encoding, one queued: workers never wait on the parent
_worker_encoder: Encoder | None = None  # one per worker process, built on its first chunk


def default_layout(cpus: int | None = None) -> tuple[int, int]:
    """(processes, threads per process) for this machine: one single-threaded process per
    core, the layout measured faster than one process with all cores as threads."""
    return cpus or usable_cpus(), 1


def usable_cpus() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class EncoderPool:
    """N processes, each with its own `Encoder` session, that embed chunks in input order.

    With `processes=1` the chunks are encoded in this process and no worker is started.
    Use it as a context manager, or call `close()`.
    """

    def __init__(
        self,
        model: str | Path | Encoder,
        processes: int | None = None,
        threads_per_process: int | None = None,
        backend: str = "auto",
        inference_precision: str = "f32",
    ) -> None:
        """`backend`, `inference_precision`: as `Encoder`'s, for a model given by path (an
        Encoder given brings its own)."""
        check_backend(backend, inference_precision)  # here, not once in every worker
        self.processes = processes or default_layout()[0]
        self.threads = threads_per_process or max(1, usable_cpus() // self.processes)
        if self.processes < 1 or self.threads < 1:
            raise ValueError(
                f"processes and threads_per_process must be >= 1, "
                f"got {self.processes} and {self.threads}"
            )
        if isinstance(model, Encoder):
            self._state = {**model.__getstate__(), "intra_op_threads": self.threads}
            self.meta = model.meta
        else:
            self.meta = load_metadata(model)  # a bad folder fails here, not in a worker
            self._state = {
                "path": str(model),
                "onnx_sha256": self.meta.onnx_sha256,
                "providers": None,
                "intra_op_threads": self.threads,
                "verify_hash": True,
                "backend": backend,
                "inference_precision": inference_precision,
            }
        self._local: Encoder | None = None
        self._pool: ProcessPoolExecutor | None = None
        if self.processes == 1 and isinstance(model, Encoder) and threads_per_process is None:
            self._local = model  # the caller's own session: no second copy of the model
        elif self.processes == 1:
            self._local = _encoder_from_state(self._state)
        else:
            self._pool = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads,),
            )

    @property
    def embedding_dim(self) -> int:
        return self.meta.embedding_dim

    def map_chunks(
        self,
        chunks: Iterable[list[str]],
        batch_size: int = 64,
        normalize: bool = False,
    ) -> Iterator[tuple[list[str], np.ndarray, TokenCounts]]:
        """Yield (chunk, embeddings, token counts) per chunk, in input order."""
        if self._local is not None:
            for chunk in chunks:
                yield (chunk, *_encode(self._local, chunk, batch_size, normalize))
            return
        pending: deque[tuple[list[str], Future]] = deque()
        try:
            for chunk in chunks:
                pending.append((chunk, self._submit(chunk, batch_size, normalize)))
                if len(pending) >= IN_FLIGHT_PER_WORKER * self.processes:
                    done_chunk, done = pending.popleft()
                    yield (done_chunk, *done.result())
            while pending:
                done_chunk, done = pending.popleft()
                yield (done_chunk, *done.result())
        except BaseException:  # Ctrl-C, SIGTERM, an error, or the caller stopped reading
            self._abort()
            raise

    def embed(
        self,
        texts: Iterable[str],
        batch_size: int = 64,
        chunk_size: int = EMBED_CHUNK_SIZE,
        normalize: bool = False,
    ) -> Iterator[np.ndarray]:
        """Like `Encoder.embed`: one (d,) row per text in input order; truncation is logged
        once as a total at the end."""
        tally = TruncationTally(self.meta.max_seq_length)
        chunks = iter_text_chunks(texts, chunk_size)
        for _, out, counts in self.map_chunks(chunks, batch_size, normalize):
            tally.add(counts)
            yield from out
        if message := tally.message():
            log.warning("diffcse_runtime: %s", message)

    def _submit(self, chunk: list[str], batch_size: int, normalize: bool) -> Future:
        assert self._pool is not None
        with signals_deferred():  # a submit may spawn a worker: never leave one half-started
            return self._pool.submit(_worker_encode, self._state, chunk, batch_size, normalize)

    def close(self) -> None:
        """Stop the workers once the chunks they are encoding are done."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _abort(self) -> None:
        """Stop the workers now: an interrupted job must not wait for chunks it will drop.
        (`ProcessPoolExecutor` has no public way to end running workers before Python 3.14.)"""
        if self._pool is None:
            return
        workers = getattr(self._pool, "_processes", None) or {}
        for worker in list(workers.values()):
            worker.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def embed_parallel(
    model: str | Path | Encoder,
    texts: Iterable[str],
    processes: int | None = None,
    threads_per_process: int | None = None,
    batch_size: int = 64,
    chunk_size: int = EMBED_CHUNK_SIZE,
    normalize: bool = False,
) -> Iterator[np.ndarray]:
    """Yield one embedding per text, in input order, computed by `processes` workers.

    The multi-process `Encoder.embed`: `texts` may be any iterable (a generator over a file);
    memory holds at most two chunks per worker. Defaults: `default_layout()`.
    """
    with EncoderPool(model, processes, threads_per_process) as pool:
        yield from pool.embed(texts, batch_size, chunk_size, normalize)


# ------------------------------------------------------------------ worker side


def _encoder_from_state(state: dict[str, Any]) -> Encoder:
    encoder = Encoder.__new__(Encoder)
    encoder.__setstate__(state)
    return encoder


def _init_worker(threads: int) -> None:
    """Runs first in each worker. The tokenizers library's Rust thread pool gets the
    worker's share of the cores too (it reads RAYON_NUM_THREADS when first used), and Ctrl-C
    is left to the parent, which stops the pool, instead of a traceback from every worker."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_encode(
    state: dict[str, Any], chunk: list[str], batch_size: int, normalize: bool
) -> tuple[np.ndarray, TokenCounts]:
    """Encode one chunk in a worker; the worker's Encoder is built once, on first use, so a
    bad model folder comes back to the parent as its own DiffcseError."""
    global _worker_encoder
    if _worker_encoder is None:
        _worker_encoder = _encoder_from_state(state)
    return _encode(_worker_encoder, chunk, batch_size, normalize)


def _encode(
    encoder: Encoder, chunk: list[str], batch_size: int, normalize: bool
) -> tuple[np.ndarray, TokenCounts]:
    out, counts = encoder.encode(
        chunk,
        batch_size=batch_size,
        normalize=normalize,
        show_progress_bar=False,
        return_token_counts=True,
    )
    return out, counts

"""diffcse-serve: run the OpenAI-compatible embeddings server on uvicorn.

Models are loaded before the port opens, so a bad model directory is one line on stderr and
exit 1, never a half-started server. SIGTERM (and Ctrl-C) stop it gracefully: uvicorn stops
accepting connections, lets the requests in flight finish, then the process exits 0.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import click

from diffcse_runtime.cli import friendly_errors
from diffcse_runtime.encoder import Encoder
from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.parallel import usable_cpus
from diffcse_runtime.serve.app import ServeSettings, create_app
from diffcse_runtime.serve.batching import BatchSettings

THREADS_PER_RUN = 4  # the default's upper bound; see worker_layout


def parse_models(specs: tuple[str, ...]) -> dict[str, Path]:
    """`NAME=DIR` or `DIR` (named after its folder) -> {name: dir}; names must be unique."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        if not name or not path:
            raise click.BadParameter(f"{spec!r}: expected DIR or NAME=DIR", param_hint="--model")
        if name in models:
            raise click.BadParameter(
                f"two models are named {name!r}; name them with NAME=DIR", param_hint="--model"
            )
        models[name] = Path(path)
    return models


def worker_layout(workers: int | None, threads: int | None) -> tuple[int, int]:
    """(workers, threads per run): by default runs of up to THREADS_PER_RUN threads filling
    the cores.

    Measured with wrk, 1-sentence requests (benchmarks/notes/serving.md): a small batch
    does not spread over many threads. On 16 cores
    one 16-thread run served 527 sentences/s at 64 clients, four 4-thread runs 895-1,097 and
    eight 2-thread runs 1,132-1,308, while a lone request took p99 6.0, 6.6-7.0 and 7.6-8.1
    ms. Four threads cost a lone request under 1 ms at p99 and about double the throughput;
    on 2 cores they make one 2-thread run, which beat two 1-thread runs on a lone request
    (p50 4.9 vs 6.1 ms).
    """
    cores = usable_cpus()
    if workers is None:
        workers = max(1, cores // threads if threads else -(-cores // THREADS_PER_RUN))
    if threads is None:
        threads = max(1, cores // workers)
    return workers, threads


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--model",
    "-m",
    "model_specs",
    multiple=True,
    required=True,
    help="Model directory to serve, as DIR (named after the folder) or NAME=DIR; repeatable.",
)
@click.option("--host", default="127.0.0.1", help="Address to bind (0.0.0.0 for all).")
@click.option("--port", default=8080, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="DIFFCSE_API_KEY",
    help="Require 'Authorization: Bearer KEY'; repeatable. Prefer the DIFFCSE_API_KEY "
    "variable: a command line is visible to other users.",
)
@click.option(
    "--max-batch-tokens",
    default=8192,
    type=click.IntRange(min=1),
    help="Padded tokens per onnxruntime run (rows x longest row).",
)
@click.option(
    "--max-wait-ms",
    default=0.0,
    type=click.FloatRange(min=0),
    help="How long a free worker waits for a batch to fill. 0: run at once; requests "
    "arriving while workers are busy are merged anyway.",
)
@click.option("--no-batching", is_flag=True, help="Run each request alone (for comparison).")
@click.option("--max-inputs", default=2048, type=click.IntRange(min=1), help="Texts per request.")
@click.option(
    "--max-body-bytes", default=8 * 1024 * 1024, type=click.IntRange(min=1), help="Body size."
)
@click.option(
    "--max-queue",
    default=8192,
    type=click.IntRange(min=1),
    help="Texts waiting per model; past it requests get 503 with Retry-After.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="onnxruntime intra-op threads per run. Default: the cores divided by --workers.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Batches run at once (threads sharing each model's session). Default: runs of up to "
    "4 threads filling the cores (1 run on 2 cores, 4 on 16, where that served 1.7-2.1x the "
    "sentences/s of one 16-thread run). More, smaller runs: more throughput under load, "
    "slower lone requests.",
)
@click.option(
    "--spin/--no-spin",
    default=False,
    help="Let onnxruntime's idle threads busy-wait between runs. Off by default: the threads "
    "share the cores with the event loop, and spinning cost c=64 throughput (1.22x vs 1.38x "
    "the unbatched server) and c=1 p99 latency (+2.0 vs +0.1 ms over a bare encode) on 2 cores.",
)
@click.option(
    "--truncate", is_flag=True, help="Cut inputs over the token limit instead of refusing them."
)
@click.option(
    "--normalize/--no-normalize", default=True, help="Unit-length embeddings, as OpenAI's are."
)
@click.option(
    "--graceful-timeout", default=30.0, type=float, help="Seconds to finish requests on SIGTERM."
)
@click.option(
    "--log-level",
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="info logs one JSON line per request (no text, no keys).",
)
@friendly_errors
def serve(
    model_specs: tuple[str, ...],
    host: str,
    port: int,
    api_keys: tuple[str, ...],
    max_batch_tokens: int,
    max_wait_ms: float,
    no_batching: bool,
    max_inputs: int,
    max_body_bytes: int,
    max_queue: int,
    threads: int | None,
    workers: int | None,
    spin: bool,
    truncate: bool,
    normalize: bool,
    graceful_timeout: float,
    log_level: str,
) -> None:
    """Serve model directories with OpenAI's embeddings API (POST /v1/embeddings)."""
    import uvicorn

    if max_queue < max_inputs:
        raise click.BadParameter(
            f"--max-queue {max_queue} is below --max-inputs {max_inputs}: a full-size request "
            "could never be queued",
            param_hint="--max-queue",
        )
    if any(not key.strip() for key in api_keys):
        raise DiffcseError("--api-key: an API key must not be empty")
    logging.basicConfig(level=log_level.upper(), format="%(message)s")
    workers, threads = worker_layout(workers, threads)
    encoders = {
        name: Encoder(path, intra_op_threads=threads, spin=spin)
        for name, path in parse_models(model_specs).items()
    }
    batch = BatchSettings(
        max_batch_tokens=max_batch_tokens,
        max_wait_s=max_wait_ms / 1000,
        max_queue=max_queue,
        workers=workers,
        normalize=normalize,
        merge=not no_batching,
    )
    settings = ServeSettings(
        api_keys=api_keys,
        max_inputs=max_inputs,
        max_body_bytes=max_body_bytes,
        truncate=truncate,
        batch=batch,
    )
    config = uvicorn.Config(
        create_app(encoders, settings),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # our own JSON line per request replaces it
        timeout_graceful_shutdown=graceful_timeout,
    )
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; a no-op
    # handler (restored by uvicorn after its own) makes that clean stop exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    serve()

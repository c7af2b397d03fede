"""diffcse-serve: run the OpenAI-compatible embeddings server on uvicorn.

Models are loaded before the port opens, so a bad model directory is one line on stderr and
exit 1, never a half-started server. SIGTERM (and Ctrl-C) stop it gracefully: uvicorn stops
accepting connections, lets the requests in flight finish, then the process exits 0.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
from pathlib import Path

import click

from diffcse_runtime.bounds import Bound, option_type
from diffcse_runtime.cli import precision_option, runtime_option
from diffcse_runtime.cli_errors import friendly_errors
from diffcse_runtime.encoder import Encoder
from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.parallel import usable_cpus
from diffcse_runtime.serve.app import create_app
from diffcse_runtime.serve.batching import BatchSettings
from diffcse_runtime.serve.gate import LOOPBACK_HOSTS, Stopping, check_api_key
from diffcse_runtime.serve.served import ServeSettings

THREADS_PER_RUN = 4  # the default's upper bound; see worker_layout
KEY_ENV = "DIFFCSE_API_KEY"
ORIGIN = re.compile(r"^https?://[^/\s?#]+$")


def parse_models(specs: tuple[str, ...]) -> dict[str, Path]:
    """`DIR` (named after its folder) or `NAME=DIR` -> {name: dir}; names must be unique.

    A spec naming an existing directory is always a DIR, even with '=' in its path
    (`runs/lr=3e-5/best`); otherwise the text before the first '=' is the name.
    """
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).is_dir():
            name, path = Path(spec).resolve().name, spec
        if not name or not path:
            raise click.BadParameter(f"{spec!r}: expected DIR or NAME=DIR", param_hint="--model")
        if name in models:
            raise click.BadParameter(
                f"two models are named {name!r}; name them with NAME=DIR", param_hint="--model"
            )
        models[name] = Path(path)
    return models


def api_keys_from(flags: tuple[str, ...], files: tuple[Path, ...]) -> tuple[str, ...]:
    """The keys of --api-key and --api-key-file, else DIFFCSE_API_KEY: each one opaque
    string (never split), refused in one sentence if empty or unusable in a header."""
    keys = [check_api_key(key, "--api-key") for key in flags]
    keys += [_key_from_file(path) for path in files]
    if not keys and KEY_ENV in os.environ:
        keys.append(check_api_key(os.environ[KEY_ENV], KEY_ENV))
    return tuple(keys)


def _key_from_file(path: Path) -> str:
    """The one line of a key file, its line ending dropped (the key stays out of `ps`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DiffcseError(f"{path}: an API key file must be UTF-8 text") from None
    key = text[:-1] if text.endswith("\n") else text
    key = key[:-1] if key.endswith("\r") else key
    if "\n" in key:
        raise DiffcseError(f"{path}: an API key file holds one key on one line")
    return check_api_key(key, f"--api-key-file {path}")


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The Host names served by default: the bound address, plus the localhost names when
    bound to loopback; any name when bound to all interfaces (0.0.0.0, ::)."""
    name = host.strip("[]").lower()
    if name in ("", "0.0.0.0", "::"):
        return ("*",)
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = name == "localhost"
    return tuple(dict.fromkeys((name, *LOOPBACK_HOSTS))) if loopback else (name,)


def split_list(values: tuple[str, ...]) -> tuple[str, ...]:
    """Repeatable, comma-separated option values as one tuple, blanks dropped."""
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def check_origins(origins: tuple[str, ...]) -> tuple[str, ...]:
    for origin in origins:
        if origin != "*" and not ORIGIN.match(origin):
            raise click.BadParameter(
                f"{origin!r} is not an origin; give scheme://host[:port], e.g. "
                "https://app.example.com",
                param_hint="--cors-origins",
            )
    return origins


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
    help="Model directory to serve, as DIR (named after the folder) or NAME=DIR; repeatable. "
    "An existing directory is a DIR even with '=' in its path.",
)
@click.option("--host", default="127.0.0.1", help="Address to bind (0.0.0.0 for all).")
@click.option("--port", default=8080, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help="Require 'Authorization: Bearer KEY'; repeatable (each one whole key). Prefer "
    "--api-key-file or the DIFFCSE_API_KEY variable (one key, used when no key option is "
    "given): a command line is visible to other users.",
)
@click.option(
    "--api-key-file",
    "api_key_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read a key from a file holding it on one line; repeatable.",
)
@click.option(
    "--allowed-hosts",
    "allowed_hosts",
    multiple=True,
    help="Host header names to serve, comma-separated; '*' for any. Default: the --host "
    "address, plus localhost, 127.0.0.1 and ::1 when it is a loopback address; any name "
    "when bound to 0.0.0.0 or ::.",
)
@click.option(
    "--cors-origins",
    "cors_origins",
    multiple=True,
    help="Browser origins (https://app.example.com) allowed to call the API, comma-"
    "separated; '*' for any. Default: none (requests carrying another Origin get 403).",
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
    type=option_type(Bound(ge=0, le=60_000)),
    help="How long a free worker waits for a batch to fill. 0: run at once; requests "
    "arriving while workers are busy are merged anyway.",
)
@click.option("--no-batching", is_flag=True, help="Run each request alone (for comparison).")
@click.option("--max-inputs", default=2048, type=click.IntRange(min=1), help="Texts per request.")
@click.option(
    "--max-body-bytes", default=8 * 1024 * 1024, type=click.IntRange(min=1), help="Body size."
)
@click.option(
    "--body-timeout",
    default=30.0,
    type=option_type(Bound(gt=0, le=86_400)),
    help="Seconds a request's whole body may take to arrive; a stalled upload gets 408.",
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
@runtime_option
@precision_option
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
    "--graceful-timeout",
    default=30.0,
    type=option_type(Bound(ge=0, le=86_400)),
    help="Seconds to finish requests on SIGTERM.",
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
    api_key_files: tuple[Path, ...],
    allowed_hosts: tuple[str, ...],
    cors_origins: tuple[str, ...],
    max_batch_tokens: int,
    max_wait_ms: float,
    no_batching: bool,
    max_inputs: int,
    max_body_bytes: int,
    body_timeout: float,
    max_queue: int,
    threads: int | None,
    workers: int | None,
    runtime: str,
    inference_precision: str,
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
    keys = api_keys_from(api_keys, api_key_files)
    hosts = split_list(allowed_hosts) or default_allowed_hosts(host)
    origins = check_origins(split_list(cors_origins))
    logging.basicConfig(level=log_level.upper(), format="%(message)s")
    if "*" in hosts and not allowed_hosts:
        logging.getLogger("diffcse_runtime.serve").warning(
            "bound to %s: any Host header is served; name this server's hosts with "
            "--allowed-hosts to refuse the others",
            host,
        )
    workers, threads = worker_layout(workers, threads)
    encoders = {
        name: Encoder(
            path,
            intra_op_threads=threads,
            spin=spin,
            backend=runtime,
            inference_precision=inference_precision,
            streams=workers,  # OpenVINO: one stream per concurrent run
        )
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
        api_keys=keys,
        allowed_hosts=hosts,
        cors_origins=origins,
        max_inputs=max_inputs,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout,
        truncate=truncate,
        batch=batch,
    )
    app = create_app(encoders, settings)
    config = uvicorn.Config(
        app,
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
    run_server(config, app.state.stopping)


def run_server(config, stopping: Stopping) -> None:
    """Run uvicorn, telling the app when a stop begins, so bodies still arriving are answered
    503 at once instead of holding the shutdown for the grace period."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            stopping.set()
            super().handle_exit(sig, frame)

    Server(config).run()


if __name__ == "__main__":
    serve()

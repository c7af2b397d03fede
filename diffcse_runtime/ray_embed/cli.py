"""`diffcse-embed-ray`: embed a corpus of any size on a local Ray or an existing cluster."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import click

from diffcse_runtime.bounds import Bound, option_type
from diffcse_runtime.cli import precision_option, runtime_option
from diffcse_runtime.cli_errors import friendly_errors
from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.model_dir import ModelMeta, load_metadata
from diffcse_runtime.openvino_backend import (
    FLOAT32_VARIANTS,
    bf16_validated,
    resolve_backend,
    resolve_precision,
)
from diffcse_runtime.ray_embed import FORMATS, watchdog
from diffcse_runtime.signals import signals_deferred, sigterm_as_interrupt
from diffcse_runtime.textio import ERROR_MODES

# every count a user gives, refused by name unless a whole number in a range that can work
ACTORS = option_type(Bound(ge=1, le=100_000), integer=True)
THREADS = option_type(Bound(ge=1, le=1024), integer=True)
NUM_CPUS = option_type(Bound(ge=1, le=1_000_000), integer=True)
SHARD_ROWS = option_type(Bound(ge=1, le=100_000_000), integer=True)
BATCH_SIZE = option_type(Bound(ge=1, le=1_000_000), integer=True)


def start_local_ray(num_cpus: int, temp_dir: str | None = None) -> None:
    """Start a private, offline Ray on this machine: no dashboard, no usage stats, its
    session files under the system's temporary folder (Ray's socket paths must stay short)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = temp_dir or os.path.join(tempfile.gettempdir(), f"diffcse-ray-{os.getuid()}")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        configure_logging=False,
    )


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data logs its whole operator table every few seconds; our own progress line is
    enough unless the user asks for more."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)


def connect(address: str) -> None:
    import ray

    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise DiffcseError(
            f"--address {address}: cannot connect to a Ray cluster ({exc})"
        ) from None


def default_actors(cpus_per_actor: float) -> int:
    """As many actors as the cluster's CPUs hold. The job has no separate read tasks (each
    actor reads its own shard), so actors may reserve every CPU without starving reads."""
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    return max(1, math.floor(total / cpus_per_actor))


@click.command(name="diffcse-embed-ray")
@click.argument("inputs", nargs=-1, required=True)
@click.argument("output_dir")
@click.option(
    "--model",
    "-m",
    required=True,
    type=click.Path(path_type=Path, exists=True),
    help="Model directory from diffcse-export (every node must see it at this path).",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster to run on (e.g. ray://head:10001 or auto); default: start a local Ray.",
)
@click.option(
    "--actors",
    type=ACTORS,
    default=None,
    help="Encoder actors; default: as many as the CPUs allow.",
)
@click.option(
    "--threads",
    type=THREADS,
    default=1,
    show_default=True,
    help="Inference threads per actor (each actor reserves as many CPUs).",
)
@click.option(
    "--num-cpus",
    type=NUM_CPUS,
    default=None,
    help="CPUs for the local Ray; default: all of this machine's.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="auto",
    show_default=True,
    help="Input format; auto: .jsonl/.ndjson, .parquet/.pq, else text lines.",
)
@click.option(
    "--text-field",
    default="text",
    show_default=True,
    help="JSONL field or Parquet column holding the text.",
)
@click.option(
    "--id-field",
    default=None,
    help="JSONL field or Parquet column to use as the row id (default: FILE:LINE "
    "for text/JSONL, FILE#ROW for Parquet).",
)
@click.option(
    "--shard-rows",
    type=SHARD_ROWS,
    default=100_000,
    show_default=True,
    help="Rows per output part; a part is the unit of retry and resume.",
)
@click.option(
    "--batch-size",
    type=BATCH_SIZE,
    default=64,
    show_default=True,
)
@click.option("--normalize", is_flag=True, help="L2-normalise the embeddings.")
@click.option("--keep-text", is_flag=True, help="Also store each row's text in the parts.")
@click.option(
    "--errors",
    type=click.Choice(ERROR_MODES),
    default="strict",
    show_default=True,
    help="Bytes that are not UTF-8: stop with FILE:LINE, or replace them.",
)
@runtime_option
@precision_option
@click.option("--verbose", "-v", is_flag=True, help="Show Ray Data's progress log.")
@friendly_errors(interrupted="interrupted; finished parts are kept, rerun to resume")
def main(
    inputs,
    output_dir,
    model,
    address,
    actors,
    threads,
    num_cpus,
    fmt,
    text_field,
    id_field,
    shard_rows,
    batch_size,
    normalize,
    keep_text,
    errors,
    runtime,
    inference_precision,
    verbose,
):
    """Embed INPUTS (files, folders or globs; local or any pyarrow filesystem URI such as
    s3://...) into Parquet parts under OUTPUT_DIR, with a manifest.json.

    Rerun the same command after a failure: finished parts are kept and only the missing
    ones are embedded.
    """
    try:
        import pyarrow  # noqa: F401
        import ray
    except ImportError as exc:
        raise DiffcseError(
            f'diffcse-embed-ray needs Ray Data and pyarrow ({exc.msg}): pip install "diffcse[ray]"'
        ) from None
    from diffcse_runtime.ray_embed.folder import check_output_folder
    from diffcse_runtime.ray_embed.job import JobSpec

    meta = load_metadata(model)  # a broken model folder fails here, before Ray starts
    engine, precision = job_engine(meta, runtime, inference_precision)  # and a missing engine
    check_output_folder(output_dir, inputs)  # so does a folder that is not this job's
    spec = JobSpec(
        inputs=list(inputs),
        model_sha256=meta.onnx_sha256,
        fmt=fmt,
        text_field=text_field,
        id_field=id_field,
        shard_rows=shard_rows,
        normalize=normalize,
        keep_text=keep_text,
        errors=errors,
        inference_precision=precision,
        engine=engine if meta.variant not in FLOAT32_VARIANTS else "any",
    )
    owns_ray = not ray.is_initialized()  # a caller's (or a test's) running Ray is reused
    guard = None
    try:
        # ray.init installs its own SIGTERM handler (exit 15 with the core worker's C++
        # stack): the inner block puts ours back, so a kill unwinds like Ctrl-C, shuts the
        # local Ray down in `finally` and exits 143 with one sentence, as the other tools do
        with signals_deferred():  # a kill during ray.init lands once ours is back
            if owns_ray and address:
                connect(address)
            elif owns_ray:
                guard = watchdog.start()  # even a SIGKILL of ours ends the local Ray
                start_local_ray(num_cpus or os.cpu_count() or 1)
        with sigterm_as_interrupt():
            result = _run(spec, model, output_dir, actors, threads, batch_size, engine, verbose)
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
        if guard is not None:
            os.close(guard)
            os.environ.pop(watchdog.MARK, None)
    click.echo(
        f"rows in {result.rows_in}, rows out {result.rows_out}; parts written "
        f"{result.shards_written}, already done {result.shards_skipped}, "
        f"{result.seconds:.1f} s; manifest {result.manifest}"
    )
    if result.rows_out != result.rows_in:
        raise DiffcseError(f"{result.manifest}: {result.rows_in - result.rows_out} rows missing")


def job_engine(meta: ModelMeta, runtime: str, inference_precision: str) -> tuple[str, str]:
    """The one engine and precision every actor of the job runs, decided here, before Ray
    starts: "auto" picks by the CPU (`resolve_backend`) and the precision "auto" by the CPU
    and the export's bf16 gate, so on a cluster of mixed CPUs each actor would otherwise
    choose its own, and one job would hold vectors of two kinds (an int8 directory's
    vectors on onnxruntime and on OpenVINO: min cosine 0.992 on STS-B dev; bf16 vs f32:
    0.995). An actor whose node cannot run the choice stops the job with one sentence.

    The check is `Encoder`'s own, so `--runtime openvino` without the openvino package is
    the sentence diffcse-embed gives. onnxruntime computes in float32 whatever is asked, so
    a job there records "f32"."""
    engine = resolve_backend(runtime, inference_precision, ["CPUExecutionProvider"])
    if engine == "onnxruntime":
        return engine, "f32"
    allowed = bf16_validated(meta.validation)  # what this machine's Encoder would take
    return engine, resolve_precision(inference_precision, allowed)


def _run(
    spec, model: Path, output_dir: str, actors, threads: int, batch_size: int, engine, verbose
):
    from diffcse_runtime.ray_embed.job import run_job

    quiet_ray_data(verbose)
    n = actors or default_actors(threads)
    click.echo(f"diffcse-embed-ray: {n} actor(s) x {threads} thread(s)", err=True)
    return run_job(
        spec,
        model.resolve(),
        output_dir,
        actors=n,
        cpus_per_actor=threads,
        threads=threads,
        batch_size=batch_size,
        backend=engine,
        progress=_progress,
        notify=lambda note: click.echo(f"diffcse-embed-ray: {note}", err=True),
    )


def _progress(done: int, total: int) -> None:
    click.echo(f"\rparts {done}/{total}", err=True, nl=done == total)

"""`diffcse-train`: train DiffCSE from a YAML config, or fit a generator.

    diffcse-train --config configs/sts_bert.yaml [--set key=value ...] [--resume] [--overwrite]
    torchrun --nproc_per_node 8 -m diffcse_train --config ...   (DDP, see distributed.py)
    diffcse-train fit-generator ...      (see diffcse-train fit-generator --help)

Every error a user can cause is printed as one line and exits with status 1.
"""

from __future__ import annotations

import logging
import sys

import click

from diffcse_runtime.errors import DiffcseError, friendly_errors

FIT_GENERATOR = "fit-generator"


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(quiet: bool = False) -> None:
    logger = logging.getLogger("diffcse_train")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    try:  # our own messages report what matters; hide transformers' loading bars
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Other command: diffcse-train fit-generator --help (fit a masked-LM generator).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one config key (repeatable), e.g. --set learning_rate=1e-5.",
)
@click.option("--resume", is_flag=True, help="Continue the run in output_dir from last/.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run in output_dir.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors.")
@friendly_errors(interrupted="interrupted; continue later with --resume (from the last checkpoint)")
def train_cmd(config_path, overrides, resume, overwrite, quiet):
    """Train a DiffCSE sentence encoder; the best model lands in OUTPUT_DIR/best."""
    setup_logging(quiet)
    try:
        from diffcse_train import distributed

        if distributed.launch_env().rank > 0:  # under torchrun, rank 0 reports for all
            logging.getLogger("diffcse_train").setLevel(logging.ERROR)
        from diffcse_train.config import load_config

        cfg = load_config(config_path, list(overrides))
        if resume and overwrite:
            raise DiffcseError("--resume and --overwrite cannot be used together")
        from diffcse_train.trainer import train

        release_now = bool(cfg.export_dir) and distributed.launch_env().rank == 0
        if release_now:
            from diffcse_train.release import check_before_training

            check_before_training(cfg, overwrite or resume)
        train(cfg, resume=resume, overwrite=overwrite)
        if release_now:  # export + before/after table, once, after the process group ends
            from diffcse_train.release import release

            release(cfg, overwrite=overwrite or resume)
    except DiffcseError as exc:  # (friendly_errors also handles Ctrl-C and SIGTERM)
        raise click.ClickException(str(exc)) from None


def _fit_generator(args: list[str]) -> None:
    try:
        from diffcse_train.generator_fit import fit_generator_cmd
    except ModuleNotFoundError as exc:
        if exc.name != "diffcse_train.generator_fit":
            raise
        click.echo(f"Error: {FIT_GENERATOR} is not available in this installation", err=True)
        sys.exit(2)
    fit_generator_cmd.main(args=args, prog_name=f"diffcse-train {FIT_GENERATOR}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: dispatch `fit-generator`, otherwise train."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == FIT_GENERATOR:
        _fit_generator(args[1:])
        return
    train_cmd.main(args=args, prog_name="diffcse-train")

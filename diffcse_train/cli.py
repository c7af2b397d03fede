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

from diffcse_runtime.bounds import click_type
from diffcse_runtime.cli_errors import friendly_errors
from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.textio import ERROR_MODES
from diffcse_train.config import DEVICES
from diffcse_train.generator import FitSettings, GeneratorRefused, fit_generator
from diffcse_train.generator.settings import FIT_PRECISIONS

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
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an earlier run in output_dir (only the entries that run wrote).",
)
@click.option("--quiet", is_flag=True, help="Only warnings and errors.")
@friendly_errors(interrupted="interrupted; continue later with --resume (from the last checkpoint)")
def train_cmd(config_path, overrides, resume, overwrite, quiet):
    """Train a DiffCSE sentence encoder; the best model lands in OUTPUT_DIR/best."""
    setup_logging(quiet)
    from diffcse_train import distributed

    if distributed.launch_env().rank > 0:  # under torchrun, rank 0 reports for all
        logging.getLogger("diffcse_train").setLevel(logging.ERROR)
    from diffcse_train.config import load_config

    cfg = load_config(config_path, list(overrides))
    if resume and overwrite:
        raise DiffcseError("--resume and --overwrite cannot be used together")
    release_now = bool(cfg.export_dir) and distributed.launch_env().rank == 0
    if release_now:
        from diffcse_train.release import check_before_training

        check_before_training(cfg, overwrite or resume)
    arms = train_arms(cfg, resume, overwrite)
    if release_now:  # export + before/after table, once, after the process group ends
        from diffcse_train.release import format_rows, release, shipped_line

        rows = release(cfg, overwrite=overwrite or resume, arms=arms)
        if rows:
            click.echo("before vs after training:\n" + format_rows(rows))
        if len(arms) > 1:
            from diffcse_train.compare import pick

            click.echo(shipped_line(arms, pick(arms), cfg))
        for arm in arms:
            if arm.report:
                click.echo(f"report ({arm.name}): {arm.report}")


def train_arms(cfg, resume: bool, overwrite: bool) -> list:
    """Train `cfg` and, with compare_with: simcse, its SimCSE twin; return both arms."""
    from diffcse_train import compare, distributed
    from diffcse_train.trainer import train

    if cfg.compare_with != "none":
        if distributed.launch_env().world_size > 1:
            raise DiffcseError(
                "compare_with: simcse trains two runs one after the other and is not "
                "supported under torchrun; train the twin as its own run instead"
            )
        compare.check_arm(cfg, resume, overwrite)  # a busy twin folder, before any training
    summary = train(cfg, resume=resume, overwrite=overwrite)
    arms = [compare.Arm.of(cfg, summary)]
    log = logging.getLogger("diffcse_train")
    if cfg.compare_with == "simcse" and not cfg.uses_discriminator:
        log.info("compare_with: simcse: this run has no discriminator, so it is its own twin")
    elif cfg.compare_with == "simcse":
        twin = compare.simcse_arm(cfg)
        log.info("compare_with: simcse: training the SimCSE twin in %s", twin.output_dir)
        twin_summary = train(twin, resume=compare.arm_resumes(twin, resume), overwrite=overwrite)
        arms.append(compare.Arm.of(twin, twin_summary))
    return arms


_FIT = FitSettings()  # the fit-generator option defaults


def _fit_type(name: str):
    """The option's type from FitSettings' declared range: one place for both."""
    return click_type(FitSettings, name)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--encoder", required=True, help="HF encoder folder, or builtin:all-MiniLM-L6-v2.")
@click.option("--corpus", required=True, help="One sentence per line, or builtin:wiki_en.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option(
    "--max-sentences",
    type=_fit_type("max_sentences"),
    default=_FIT.max_sentences,
    show_default=True,
    help="Training sentences per epoch (default: all).",
)
@click.option("--all-sentences", is_flag=True, help="Train on every sentence (the default).")
@click.option(
    "--epochs",
    type=_fit_type("epochs"),
    default=_FIT.epochs,
    show_default=True,
    help="AdamW passes over the training sentences after the warm start (0: warm start only).",
)
@click.option("--max-steps", type=_fit_type("max_steps"), help="Stop AdamW after this many steps.")
@click.option(
    "--batch-size", type=_fit_type("batch_size"), default=_FIT.batch_size, show_default=True
)
@click.option(
    "--max-length", type=_fit_type("max_length"), default=_FIT.max_length, show_default=True
)
@click.option(
    "--warm-start/--no-warm-start",
    default=_FIT.warm_start,
    show_default=True,
    help="Initialise a new head by least squares before AdamW.",
)
@click.option(
    "--lr", type=_fit_type("lr"), default=_FIT.lr, show_default=True, help="Head learning rate."
)
@click.option(
    "--unfreeze-top-k",
    type=_fit_type("unfreeze_top_k"),
    default=_FIT.unfreeze_top_k,
    help="Train only the encoder's top k layers and the head (0: the head only, on a frozen "
    "encoder: fast, weak). Default: the whole copy trains (the encoder folder is not touched).",
)
@click.option(
    "--precision",
    type=click.Choice(FIT_PRECISIONS),
    default=_FIT.precision,
    show_default=True,
    help="Autocast while training; auto = bf16 where the CPU computes it natively.",
)
@click.option(
    "--mask-ratio",
    type=_fit_type("mask_ratio"),
    default=_FIT.mask_ratio,
    show_default=True,
    help="Fraction of training tokens masked (80% [MASK], 10% random, 10% kept).",
)
@click.option(
    "--encoder-lr",
    type=_fit_type("encoder_lr"),
    default=_FIT.encoder_lr,
    show_default=True,
    help="Learning rate of the encoder's trainable part.",
)
@click.option(
    "--copy-ratio",
    type=_fit_type("copy_ratio"),
    default=_FIT.copy_ratio,
    show_default=True,
    help="Fraction of unmasked tokens also trained to reproduce themselves (DiffCSE reads "
    "the generator's argmax at every position).",
)
@click.option(
    "--min-accuracy-gain",
    type=_fit_type("min_accuracy_gain"),
    default=_FIT.min_accuracy_gain,
    show_default=True,
    help="Refuse to save unless held-out accuracy beats the unigram baseline by this much.",
)
@click.option("--seed", type=_fit_type("seed"), default=_FIT.seed, show_default=True)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default=_FIT.device,
    show_default=True,
    help="Where the model trains; auto takes CUDA where present.",
)
@click.option(
    "--errors",
    type=click.Choice(ERROR_MODES),
    default=_FIT.errors,
    show_default=True,
    help="Bad UTF-8 in --corpus: stop with FILE:LINE, or replace it.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an --out folder fit-generator wrote (its .diffcse-manifest.json lists "
    "every entry; anything else there is refused).",
)
@click.option("--quiet", is_flag=True, help="No progress bars; only the result.")
@friendly_errors
def fit_generator_cmd(encoder, corpus, out, all_sentences, overwrite, quiet, **options):
    """Fit a copy of an encoder as a masked LM: a DiffCSE generator with its vocabulary.

    Saves an AutoModelForMaskedLM folder (config, safetensors, tokenizer, fit_report.json)
    only if its held-out fill-mask accuracy and perplexity beat the unigram baseline.
    """
    setup_logging(quiet)
    if all_sentences:
        options["max_sentences"] = None
    settings = FitSettings(**options)
    try:
        report = fit_generator(encoder, corpus, out, settings, overwrite, progress=not quiet)
    except GeneratorRefused as exc:
        click.echo(exc.report.table(), err=True)
        raise click.ClickException(str(exc)) from None
    click.echo(report.table())
    click.echo(
        f"{report.steps} AdamW steps, {report.seconds:.0f} s wall, {report.cpu_seconds:.0f} s CPU "
        f"in all; saved {out}"
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: dispatch `fit-generator`, otherwise train."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == FIT_GENERATOR:
        fit_generator_cmd.main(args=args[1:], prog_name=f"diffcse-train {FIT_GENERATOR}")
        return
    train_cmd.main(args=args, prog_name="diffcse-train")

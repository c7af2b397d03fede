"""What `train()` checks before anything slow: the device, the run folder and the corpus
(every row of it, sentences or supervised triplets).

These are the errors a user can fix in seconds (a busy output_dir, a missing --resume
checkpoint, a corpus smaller than one batch), so they come before a generator is fitted
(`fit_generator: true`) or a model is loaded. A `Trainer` is built from what they found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcse_runtime.errors import DiffcseError
from diffcse_train import distributed
from diffcse_train.config import TrainConfig
from diffcse_train.data import load_corpus
from diffcse_train.run_dir import RunDir
from diffcse_train.triplets import Triplet, load_triplets, resolve_objective

log = logging.getLogger(__name__)


@dataclass
class RunSetup:
    """The device (the process group joined under torchrun), the checked run folder with
    what --overwrite replaces once the new run is built, and the corpus and its steps:
    sentences (objective unsupervised) or triplets (supervised)."""

    device: torch.device
    run_dir: RunDir
    replaced: list[Path]
    sentences: list[str] | list[Triplet]
    steps_per_epoch: int
    total_steps: int
    objective: str = "unsupervised"


def prepare_run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> RunSetup:
    """The cheap checks, in order: device, run folder (rank 0), corpus and its step count."""
    device = distributed.setup(distributed.pick_device(cfg.device))
    run_dir = RunDir(cfg.output_dir)
    replaced = distributed.main_only(run_dir.check, cfg, resume, overwrite)
    objective, rows = read_train_file(cfg)
    world = distributed.world_size()
    steps_per_epoch = len(rows) // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        on = f" x {world} processes" if world > 1 else ""
        what = "sentences" if objective == "unsupervised" else "rows"
        raise DiffcseError(
            f"train_file {cfg.train_file}: {len(rows)} {what}, fewer than "
            f"batch_size {cfg.batch_size}{on}"
        )
    total = steps_per_epoch * cfg.epochs
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    return RunSetup(device, run_dir, replaced, rows, steps_per_epoch, total, objective)


def read_train_file(cfg: TrainConfig) -> tuple[str, list[str] | list[Triplet]]:
    """(objective, its rows): every row read and checked now, before a model is loaded."""
    objective = resolve_objective(cfg.objective, cfg.train_file, cfg.encoding_errors)
    if objective == "unsupervised":
        corpus = load_corpus(cfg.train_file, cfg.encoding_errors)
        if corpus.empty_lines:
            log.warning("train_file %s: skipped %d empty lines", cfg.train_file, corpus.empty_lines)
        return objective, corpus.sentences
    if cfg.fit_generator and cfg.needs_generator and not Path(cfg.generator_name_or_path).exists():
        raise DiffcseError(
            f"fit_generator fits the generator on one sentence per line, not on the "
            f"supervised train_file {cfg.train_file}; fit it first with diffcse-train "
            f"fit-generator --corpus SENTENCES --out {cfg.generator_name_or_path}"
        )
    data = load_triplets(cfg.train_file, cfg.encoding_errors)
    if data.blank_lines:
        log.warning("train_file %s: skipped %d blank lines", cfg.train_file, data.blank_lines)
    log.info(
        "objective supervised: %d rows of sent0, sent1%s from %s",
        len(data.triplets), ", hard_neg" if data.hard_negatives else "", cfg.train_file,
    )  # fmt: skip
    return objective, data.triplets

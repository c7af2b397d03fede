"""What `train()` checks before anything slow: the device, the run folder and the corpus.

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

log = logging.getLogger(__name__)


@dataclass
class RunSetup:
    """The device (the process group joined under torchrun), the checked run folder with
    what --overwrite replaces once the new run is built, and the corpus and its steps."""

    device: torch.device
    run_dir: RunDir
    replaced: list[Path]
    sentences: list[str]
    steps_per_epoch: int
    total_steps: int


def prepare_run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> RunSetup:
    """The cheap checks, in order: device, run folder (rank 0), corpus and its step count."""
    device = distributed.setup(distributed.pick_device(cfg.device))
    run_dir = RunDir(cfg.output_dir)
    replaced = distributed.main_only(run_dir.check, cfg, resume, overwrite)
    corpus = load_corpus(cfg.train_file, cfg.encoding_errors)
    if corpus.empty_lines:
        log.warning("train_file %s: skipped %d empty lines", cfg.train_file, corpus.empty_lines)
    world = distributed.world_size()
    steps_per_epoch = len(corpus.sentences) // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        on = f" x {world} processes" if world > 1 else ""
        raise DiffcseError(
            f"train_file {cfg.train_file}: {len(corpus.sentences)} sentences, fewer than "
            f"batch_size {cfg.batch_size}{on}"
        )
    total = steps_per_epoch * cfg.epochs
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    return RunSetup(device, run_dir, replaced, corpus.sentences, steps_per_epoch, total)

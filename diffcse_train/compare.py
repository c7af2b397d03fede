"""`compare_with: simcse`: the main job also trains SimCSE and ships the better of the two.

Why: DiffCSE adds a discriminator whose gradient into the sentence vector carries signal
only once D has learned the generator's edits. On a short CPU budget it may not have, and
then the RTD term costs time and buys nothing. A user who runs the main job should see
that in its table, not read about it elsewhere. So the SimCSE arm is the same config
(model, data, seed, learning rate, steps, selection) with lambda_weight 0 and no
augmentation, trained in OUTPUT_DIR-simcse beside the run, and the arm with the higher
selection score (the `select_on` tasks' dev Spearman, STS-B dev by default) ships. A tie
ships the configured objective. The other arm is still exported and scored, and its row
stays in the table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from diffcse_train.config import TrainConfig, objective_name
from diffcse_train.run_dir import RunDir

COMPARE_WITH = ("none", "simcse")


@dataclass
class Arm:
    """One trained objective: its name in the table, its config and its selection score."""

    name: str
    cfg: TrainConfig
    best_score: float | None = None
    best_step: int | None = None
    report: str | None = None

    @classmethod
    def of(cls, cfg: TrainConfig, summary) -> Arm:
        """The arm a finished `train()` call describes, named by the objective it resolved."""
        name = objective_name(cfg, summary.objective)
        return cls(name, cfg, summary.best_score, summary.best_step, summary.report)

    @property
    def best_dir(self) -> Path:
        return RunDir(self.cfg.output_dir).best


def simcse_arm(cfg: TrainConfig) -> TrainConfig:
    """The SimCSE twin of `cfg`: no discriminator, nothing else changed, its own folder."""
    return dataclasses.replace(
        cfg,
        lambda_weight=0.0,
        augmentation="none",
        output_dir=f"{str(cfg.output_dir).rstrip('/')}-simcse",
        export_dir=None,
        compare_with="none",
        discriminator_learning_rate=None,
        discriminator_warmup_steps=0,
        lambda_warmup_steps=0,
    )


def arm_resumes(arm: TrainConfig, resume: bool) -> bool:
    """--resume continues the arm only where it left a checkpoint; a missing one starts."""
    return resume and (RunDir(arm.output_dir).last / "trainer_state.json").is_file()


def check_arm(cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuse a busy arm folder before the main run trains, not after it."""
    if not cfg.uses_discriminator:  # SimCSE already: no twin is trained
        return
    arm = simcse_arm(cfg)
    RunDir(arm.output_dir).check(arm, arm_resumes(arm, resume), overwrite)


def pick(arms: list[Arm]) -> Arm:
    """The arm with the highest selection score; the first (configured) one on a tie or
    when no dev data scored any."""
    scored = [a for a in arms if a.best_score is not None]
    if not scored:
        return arms[0]
    return max(scored, key=lambda a: (a.best_score, -arms.index(a)))

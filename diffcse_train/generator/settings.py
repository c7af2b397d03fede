"""The bottom of the generator wing: what shapes a fit and what a fit reports.

Plain dataclasses and the refusal error, no torch: every layer above (the masked-LM
mechanics, the optimisation loop, the orchestration) and the CLI read them, and this module
imports none of those.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from diffcse_runtime.bounds import bounded
from diffcse_runtime.errors import DiffcseError

# autocast while fitting; TrainConfig's `precision` has its own list (no "auto", plus fp16)
FIT_PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class FitSettings:
    """Everything that shapes a fit; the CLI's defaults come from here."""

    # The default trains the whole copy, one pass over the corpus (see loop.py).
    max_sentences: int | None = bounded(None, ge=1)  # training sentences per epoch; None = all
    epochs: int = bounded(1, ge=0)
    max_steps: int | None = bounded(None, ge=0)  # stop AdamW early; None = all epochs
    batch_size: int = bounded(64, ge=1)
    max_length: int = bounded(32, ge=4)
    # encoder layers that train: None = all, 0 = head only
    unfreeze_top_k: int | None = bounded(None, ge=0)
    lr: float = bounded(1e-3, gt=0, le=1)  # the head
    # the encoder's trainable part (1e-4: 27.6% fill; 3e-4: 30.6%)
    encoder_lr: float = bounded(3e-4, gt=0, le=1)
    precision: str = "auto"  # autocast while training: auto (bf16 where native) | bf16 | fp32
    warm_start: bool = True  # least-squares initialisation of a new head
    warm_start_sentences: int = bounded(2_000, ge=1)  # encoded for it when the encoder trains too
    # of the training tokens, BERT's 80/10/10 rule
    mask_ratio: float = bounded(0.15, ge=0.01, le=0.9)
    # DiffCSE reads G's argmax at every position, so G must also hand back the tokens it was
    # not asked to fill: this fraction of the unmasked tokens is trained to reproduce itself.
    copy_ratio: float = bounded(0.1, ge=0, le=1)
    # held-out tokens all set to [MASK]: fill-mask accuracy
    eval_mask_ratio: float = bounded(0.15, gt=0, lt=1)
    eval_fraction: float = bounded(0.02, gt=0, lt=0.5)
    min_eval_sentences: int = bounded(300, ge=1)
    # absolute; G must beat the unigram baseline by this
    min_accuracy_gain: float = bounded(0.01, ge=0, le=1)
    seed: int = bounded(0, ge=0, lt=2**32)
    errors: str = "strict"  # how to decode bad UTF-8 in the corpus: strict | replace
    device: str = "auto"  # auto (CUDA where present) | cpu | cuda; masks are drawn on the CPU


@dataclass
class MLMScore:
    """Masked-token accuracy and perplexity over the held-out slice's masked positions, and
    how often the argmax at the unmasked positions is the input token (`copy_accuracy`)."""

    accuracy: float
    perplexity: float
    tokens: int
    copy_accuracy: float | None = None


@dataclass
class FitReport:
    encoder: str
    corpus: str
    architecture: str
    train_sentences: int
    eval_sentences: int
    steps: int
    trainable_parameters: int
    unigram: MLMScore
    before: MLMScore  # the new head as initialised (its bias = log unigram frequencies)
    warm_start: MLMScore | None  # after the least-squares warm start, if one ran
    after: MLMScore
    seconds: float
    settings: FitSettings
    out: str | None = None
    cpu_seconds: float | None = None  # this process's CPU time (all threads), for the load

    @property
    def improved(self) -> bool:
        """Better than the unigram baseline on both accuracy (by the margin) and perplexity."""
        gain = self.after.accuracy - self.unigram.accuracy
        return (
            gain >= self.settings.min_accuracy_gain
            and self.after.perplexity < self.unigram.perplexity
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        rows = [("unigram baseline", self.unigram), ("before", self.before)]
        rows += [("least-squares start", self.warm_start)] if self.warm_start else []
        rows += [("after", self.after)]
        lines = [f"{'held-out tokens':<24}{'masked: accuracy':>17}{'perplexity':>12}{'copy':>8}"]
        for name, r in rows:
            copy = f"{r.copy_accuracy:>8.1%}" if r.copy_accuracy is not None else f"{'-':>8}"
            lines.append(f"{name:<24}{r.accuracy:>17.2%}{r.perplexity:>12.1f}{copy}")
        lines.append("(copy: the argmax at unmasked tokens is the input token)")
        return "\n".join(lines)


class GeneratorRefused(DiffcseError):
    """The fitted head is no better than the unigram baseline; `report` says by how much."""

    def __init__(self, message: str, report: FitReport):
        super().__init__(message)
        self.report = report

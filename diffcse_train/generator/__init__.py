"""Fitting a masked-LM generator G (`diffcse-train fit-generator`, `fit_generator: true`).

A one-way wing: each module imports only the ones listed below it, never one above.

    fit.py        orchestration: fit_generator, ensure_generator (load, split, fit, score,
                  refuse or save)
    loop.py       the optimisation: the head's least-squares warm start, AdamW on the head
                  or through the whole masked LM
    masked_lm.py  the masked-LM mechanics: Masking, hidden_states, masked_logits,
                  find_head, loading an encoder as a masked LM, score
    settings.py   FitSettings, MLMScore, FitReport, GeneratorRefused (no torch)
"""

from __future__ import annotations

from diffcse_train.generator.fit import ensure_generator, fit_generator
from diffcse_train.generator.settings import FitReport, FitSettings, GeneratorRefused, MLMScore

__all__ = [
    "FitReport",
    "FitSettings",
    "GeneratorRefused",
    "MLMScore",
    "ensure_generator",
    "fit_generator",
]

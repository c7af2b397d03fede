"""The optimizer and learning-rate schedule of a training run, as HF Trainer sets them up:
AdamW without weight decay on biases and LayerNorm weights, linear warm-up then decay."""

from __future__ import annotations

import torch

from diffcse_train.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; like HF Trainer, no weight decay on biases and LayerNorm weights.

    D (and its head) may get its own peak rate (`discriminator_learning_rate`): the paper's
    one rate suits 31k steps, but in a short run D learns the generator's edits too slowly
    for its gradient into h to carry signal. The schedule scales every group alike.
    """
    d_lr = cfg.discriminator_learning_rate or cfg.learning_rate
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name
        in_d = name.startswith("discriminator.")
        groups.setdefault((in_d, skip or param.ndim < 2), []).append(param)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": d_lr if in_d else cfg.learning_rate,
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            }
            for (in_d, no_decay), params in sorted(groups.items())
        ],
        lr=cfg.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
    )


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the peak rate, then linear decay to 0 at `total_steps` (HF's default)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""Run by torchrun from tests/train/test_train_ddp.py: DDP scenarios on the real Trainer.

    torchrun --standalone --nproc_per_node 2 tests/support/ddp_worker.py SPEC.json

SPEC.json: {"scenarios": [{"name", "config": {TrainConfig keys}, "optimizer": "sgd",
"adamw" or "plain", "batch": path of a saved global batch or null}]}. With a batch, every
rank takes its rows of it and makes one `train_step`; rank 0 saves the trainable state to
OUTPUT_DIR/params.pt. Without one, `run()` trains (and checkpoints) as usual. "plain" is
the Trainer exactly as `diffcse-train` builds it.

The test builds its single-process references with the same `build_trainer`.
"""

from __future__ import annotations

import json
import sys

import torch

from diffcse_train import distributed
from diffcse_train.config import TrainConfig
from diffcse_train.trainer import Trainer


def build_trainer(cfg: TrainConfig, optimizer: str) -> Trainer:
    """A Trainer whose model runs in float64, so that summation order (one process over 2B
    rows vs two over B) cannot hide or fake a difference; `sgd` (lr 1, so the update is the
    gradient itself: a wrongly scaled gradient shows) or the trainer's own AdamW."""
    wrap = distributed.wrap_model
    distributed.wrap_model = lambda model, device: wrap(model.double(), device)
    try:
        trainer = Trainer(cfg, overwrite=True)
    finally:
        distributed.wrap_model = wrap
    if optimizer == "sgd":
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        trainer.optimizer = torch.optim.SGD(params, lr=1.0)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    return trainer


def rank_rows(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch: one block of the B sentence rows, and the same
    block of each view of the 2B-row edited inputs (view 1 of every sentence, then view 2)."""
    n = batch["input_ids"].size(0)
    size = n // world
    out = {}
    for key, value in batch.items():
        blocks = [value[i * n : (i + 1) * n] for i in range(value.size(0) // n)]
        out[key] = torch.cat([b[rank * size : (rank + 1) * size] for b in blocks])
    return out


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in trainer.model.trainable_state_dict().items()}


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    try:
        for scenario in spec["scenarios"]:
            cfg = TrainConfig(**scenario["config"])
            if scenario["optimizer"] == "plain":
                trainer = Trainer(cfg)
            else:
                trainer = build_trainer(cfg, scenario["optimizer"])
            if scenario["batch"] is None:
                trainer.run()
                continue
            batch = torch.load(scenario["batch"], weights_only=True)
            local = rank_rows(batch, distributed.rank(), distributed.world_size())
            trainer.train_step(local)
            if distributed.is_main():
                torch.save(trainable_state(trainer), f"{cfg.output_dir}/params.pt")
            distributed.barrier()
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])

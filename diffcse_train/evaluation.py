"""The trainer's dev evaluation: which STS data it scores, under which metric keys, and the
encode function that scores the model in training (f's pooled vectors, before the projector).

Scoring itself is the runtime's (`diffcse_runtime.sts.evaluate`), the one STS evaluator; this
module only adapts a PyTorch model to it and decides which dev tasks are present.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from diffcse_runtime import sts
from diffcse_train.model import DiffCSE, pool
from diffcse_train.precision import autocast

log = logging.getLogger("diffcse_train")
EVAL_TASK = "STSBenchmark"  # the official protocol's dev task; eval_tasks may add SICK-R
TASK_KEYS = {"STSBenchmark": "stsb_dev", "SICKRelatedness": "sick_trial"}  # metrics.jsonl


def make_encode_fn(
    model: DiffCSE,
    tokenizer,
    device: torch.device,
    dtype: torch.dtype | None = None,
    batch_size: int = 128,
) -> Callable[[list[str]], np.ndarray]:
    """encode(sentences) -> f's pooled vectors before the projector, eval mode, no grad.

    `dtype` None scores in fp32, as the official trainer does even when it trains in fp16.
    """
    positions = getattr(model.encoder.config, "max_position_embeddings", 512)
    max_length = min(512, tokenizer.model_max_length, positions - 2)

    def encode(sentences: list[str]) -> np.ndarray:
        was_training = model.training
        model.eval()
        out = np.zeros((len(sentences), model.encoder.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        try:
            with torch.no_grad(), autocast(device, dtype):
                for start in range(0, len(order), batch_size):
                    chunk = order[start : start + batch_size]
                    enc = tokenizer(
                        [sentences[i] for i in chunk],
                        padding=True,
                        truncation=True,
                        max_length=max_length,
                        return_tensors="pt",
                    )
                    mask = enc["attention_mask"].to(device)
                    hidden = model.encoder(
                        input_ids=enc["input_ids"].to(device), attention_mask=mask
                    ).last_hidden_state
                    out[chunk] = pool(hidden, mask, model.pooling).float().cpu().numpy()
        finally:
            model.train(was_training)
        return out

    return encode


def find_eval_data(data_dir: str | None) -> Path | None:
    """`data_dir` when it holds the STS-B dev split, else None: training goes on without
    evaluation (and says so) rather than failing on a missing benchmark."""
    if not data_dir or EVAL_TASK not in sts.available_tasks(data_dir, "dev"):
        where = f"under {data_dir}" if data_dir else "(eval_data_dir is not set)"
        log.warning(
            "no STS-B dev data %s: training without evaluation; best/ will hold the last step",
            where,
        )
        return None
    return Path(data_dir)


def present_eval_tasks(eval_tasks: str, eval_dir: Path | None) -> list[str]:
    """The comma-separated `eval_tasks` whose dev split exists under eval_dir (STS-B always,
    checked by find_eval_data)."""
    wanted = [t.strip() for t in eval_tasks.split(",") if t.strip()]
    if eval_dir is None:
        return wanted
    found = sts.available_tasks(eval_dir, "dev")
    present = [t for t in wanted if t in found]
    for task in sorted(set(wanted) - set(present)):
        log.warning("eval_tasks: no %s data under %s; selecting without it", task, eval_dir)
    return present or [EVAL_TASK]

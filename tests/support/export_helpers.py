"""Test inputs for export: a tiny "training output" folder and a tiny STS-B dev file.

`make_checkpoint` writes what diffcse-train's best/ folder holds (see
diffcse_train/checkpoint.py) next to a copy of a tiny encoder: projector.safetensors with
random weights and random BatchNorm running statistics, and diffcse_head.json. The tests
build it themselves so they never depend on the trainer.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from tests.support import tiny


def make_checkpoint(encoder_dir: Path, out: Path, projector: str = "batchnorm", seed: int = 0):
    """Copy `encoder_dir` to `out` and add a projector with non-trivial BN statistics."""
    import torch
    from safetensors.torch import save_file

    shutil.copytree(encoder_dir, out)
    dim = json.loads((out / "config.json").read_text())["hidden_size"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=gen) * scale + offset

    if projector == "batchnorm":
        state = {
            "linear1.weight": rand(2 * dim, dim, scale=dim**-0.5),
            "bn1.weight": rand(2 * dim, scale=0.3, offset=1.0),
            "bn1.bias": rand(2 * dim, scale=0.3),
            "bn1.running_mean": rand(2 * dim, scale=0.5),
            "bn1.running_var": rand(2 * dim).abs() + 0.2,
            "bn1.num_batches_tracked": torch.tensor(125),
            "linear2.weight": rand(dim, 2 * dim, scale=(2 * dim) ** -0.5),
            "bn2.running_mean": rand(dim, scale=0.5),
            "bn2.running_var": rand(dim).abs() + 0.2,
            "bn2.num_batches_tracked": torch.tensor(125),
        }
    else:
        state = {"linear1.weight": rand(dim, dim, scale=dim**-0.5), "linear1.bias": rand(dim)}
    if projector != "none":
        save_file(state, str(out / "projector.safetensors"))
    head = {"format": "diffcse-head", "version": 1, "projector": projector, "hidden_size": dim}
    if projector == "batchnorm":
        head["batchnorm_eps"] = 1e-5
    (out / "diffcse_head.json").write_text(json.dumps(head))
    return out


def make_sts_dir(out: Path, n_pairs: int = 150, seed: int = 0) -> Path:
    """A SentEval-layout STSBenchmark/sts-dev.csv of tiny-corpus pairs; gold = word overlap."""
    sents = tiny.corpus(2 * n_pairs, seed=seed)
    rng = random.Random(seed)
    lines = []
    for i in range(n_pairs):
        a, b = sents[2 * i], sents[2 * i + 1] if rng.random() < 0.5 else sents[2 * i]
        if a == b:
            b = a.replace(a.split()[1], rng.choice(["dog", "horse", "boy"]), 1)
        wa, wb = set(a.split()), set(b.split())
        gold = 5.0 * len(wa & wb) / len(wa | wb)
        lines.append(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{gold:.3f}\t{a}\t{b}")
    folder = out / "STSBenchmark"
    folder.mkdir(parents=True)
    (folder / "sts-dev.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def scale_last_weight(model, factor: float) -> str:
    """Multiply the weight of the graph's last MatMul/Gemm that has one by `factor` (in place);
    return its name. Used to prove the parity gate catches a wrong graph."""
    import numpy as np
    import onnx

    initializers = {t.name: t for t in model.graph.initializer}
    weighted = [
        n
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in initializers
    ]
    weights = initializers[weighted[-1].input[1]]
    array = onnx.numpy_helper.to_array(weights) * np.float32(factor)
    weights.CopyFrom(onnx.numpy_helper.from_array(array, weights.name))
    return weights.name

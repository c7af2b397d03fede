"""Training throughput: steps/s and tokens/s of the DiffCSE training step.

The step is the trainer's own: `diffcse_train.trainer.Trainer.train_step` (forward of f on
two dropout views, projector, contrastive loss, the frozen generator where the
augmentation needs one, the conditional discriminator, RTD loss, backward, clipping,
AdamW, schedule) on batches made by the trainer's `Collator`, batch 64, max length 32.
Nothing is re-implemented here: each variant is a Trainer built from a config.

CPU (default): the small config (configs/demo_cpu.yaml: all-MiniLM-L6-v2 as f and D,
6 layers, hidden 384) at batch 64 / length 32, fp32, for SimCSE (lambda 0), DiffCSE with
the generator-free `replace` edit, and DiffCSE with `mlm` through a fitted generator
(--generator DIR, e.g. runs/generator-minilm from `diffcse-train fit-generator`) when given.

CUDA (when available, or --size base): the paper's shapes with random weights, f and D
BERT-base (12 layers, 768), G DistilBERT-size MLM, same vocabulary (30,522), augmentation
mlm; variants fp32, bf16 and fp16 autocast, then speed-ups that keep the math: fused
AdamW, the frozen generator in bf16, torch.compile of f and D. The projected time of the
paper's 2 epochs over 1M sentences (31,250 steps) is printed beside the paper's 3-6 h on
one 2080Ti.

Variants run round-robin (a few steps each per round) after warm-up; medians reported.
Run: python -m benchmarks.train_step
     python -m benchmarks.train_step --steps 2 --rounds 2      (smoke)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import benchlib
from benchmarks.benchlib import ROOT, BenchSkip

PAPER_STEPS = 31_250  # 2 epochs x 1M sentences / batch 64
PAPER_HOURS = (3.0, 6.0)  # DiffCSE paper, one 2080Ti
CPU_VARIANTS = ("simcse", "diffcse-replace", "diffcse-mlm")
GPU_VARIANTS = (
    "fp32",
    "bf16",
    "fp16",
    "bf16+fused-adamw",
    "bf16+fused-adamw+G-bf16",
    "bf16+fused-adamw+G-bf16+compile",
)


@dataclass
class Variant:
    name: str
    overrides: list[str]
    tweaks: list[str] = field(default_factory=list)  # fused-adamw, G-bf16, compile
    trainer: object = None
    times: list[float] = field(default_factory=list)
    collate: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    error: str = ""


# ---------------------------------------------------------------- model folders


def random_base_models(tmp: Path) -> tuple[Path, Path]:
    """BERT-base-shaped f/D and a DistilBERT-shaped MLM G with random weights, sharing
    all-MiniLM-L6-v2's tokenizer (the bert-base-uncased vocabulary)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertForMaskedLM

    tok_src = benchlib.minilm_dir()
    torch.manual_seed(0)
    bert, gen = tmp / "bert-base-random", tmp / "distilbert-mlm-random"
    BertModel(BertConfig(vocab_size=30522)).save_pretrained(bert)
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=30522)).save_pretrained(gen)
    for folder in (bert, gen):
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "special_tokens_map.json",
        ):
            if (tok_src / name).is_file():
                shutil.copy(tok_src / name, folder / name)
    return bert, gen


def cpu_variants(names: list[str], generator: Path | None) -> list[Variant]:
    out = []
    for name in names:
        if name == "simcse":
            out.append(Variant(name, ["lambda_weight=0"]))
        elif name == "diffcse-replace":
            out.append(Variant(name, ["augmentation=replace"]))
        elif name == "diffcse-mlm":
            v = Variant(name, ["augmentation=mlm", f"generator_name_or_path={generator}"])
            if generator is None:
                v.error = "no fitted generator: pass --generator DIR (diffcse-train fit-generator)"
            out.append(v)
        else:
            raise SystemExit(f"unknown CPU variant {name!r}; choose from {CPU_VARIANTS}")
    return out


def gpu_variants(names: list[str], bert: Path, gen: Path) -> list[Variant]:
    common = [
        f"model_name_or_path={bert}",
        f"generator_name_or_path={gen}",
        "augmentation=mlm",
        "lambda_weight=0.005",
        "learning_rate=7e-6",
    ]
    out = []
    for name in names:
        if name not in GPU_VARIANTS:
            raise SystemExit(f"unknown GPU variant {name!r}; choose from {GPU_VARIANTS}")
        precision, *tweaks = name.split("+")
        out.append(Variant(name, [*common, f"precision={precision}"], tweaks))
    return out


# ---------------------------------------------------------------- building and stepping


def build(v: Variant, device: str, tmp: Path, batch: int, length: int, threads: int):
    import torch

    from diffcse_train.config import load_config
    from diffcse_train.optim import linear_schedule
    from diffcse_train.trainer import Trainer

    cfg = load_config(
        ROOT / "configs" / "demo_cpu.yaml",
        [
            *v.overrides,
            f"batch_size={batch}",
            f"max_seq_length={length}",
            f"device={device}",
            f"output_dir={tmp / v.name}",
            "eval_data_dir=null",
            "max_steps=100000",
        ],
    )
    torch.set_num_threads(threads)
    trainer = Trainer(cfg, overwrite=True)
    if "fused-adamw" in v.tweaks:  # same AdamW update, one fused kernel per parameter group
        old = trainer.optimizer
        groups = [
            {"params": g["params"], "weight_decay": g["weight_decay"]} for g in old.param_groups
        ]
        trainer.optimizer = torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True
        )
        trainer.scheduler = linear_schedule(
            trainer.optimizer, cfg.warmup_steps, trainer.total_steps
        )
    model = trainer.model
    if "G-bf16" in v.tweaks and model.generator is not None:
        model.generator.to(torch.bfloat16)  # frozen and argmax-only: bf16 weights suffice
    if "compile" in v.tweaks:
        model.encoder.compile(dynamic=True)
        if model.discriminator is not None:
            model.discriminator.encoder.compile(dynamic=True)
    v.trainer = trainer


def step(v: Variant, sentences: list[str], device: str) -> None:
    """One timed training step: collate (timed apart) + Trainer.train_step."""
    import torch

    t0 = time.perf_counter()
    batch = {k: t.to(device) for k, t in v.trainer.collator(sentences).items()}
    t1 = time.perf_counter()
    v.trainer.train_step(batch)  # ends with loss.item(): the step is complete on return
    if device == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    v.collate.append(t1 - t0)
    v.times.append(t2 - t1)
    v.tokens.append(int(batch["attention_mask"].sum()))


def run_device(device: str, size: str, args, tmp: Path) -> list[dict]:
    from diffcse_train.data import load_corpus

    base = size == "base"
    if base:
        bert, gen = random_base_models(tmp)
        variants = gpu_variants(args.gpu_variants.split(","), bert, gen)
        if device == "cpu":
            variants = [v for v in variants if v.name in ("fp32", "bf16")]
    else:
        variants = cpu_variants(args.cpu_variants.split(","), args.generator)
    threads = args.threads
    for v in variants:
        if v.error:
            continue
        try:
            build(v, device, tmp, args.batch_size, args.max_length, threads)
        except Exception as exc:  # report and go on with the other variants
            v.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(f"  {v.name}: {'ready' if not v.error else v.error}", file=sys.stderr, flush=True)
    live = [v for v in variants if not v.error]
    corpus = load_corpus("builtin:wiki_en").sentences
    bs = args.batch_size
    batches = (corpus[i * bs : (i + 1) * bs] for i in range(10**9))
    for v in live:  # warm-up (allocator, autotuning, compilation), untimed
        for _ in range(args.warmup):
            try:
                step(v, next(batches), device)
            except Exception as exc:
                v.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                break
        v.times.clear(), v.collate.clear(), v.tokens.clear()
    live = [v for v in live if not v.error]
    for r in range(args.rounds):
        for v in live[r % max(len(live), 1) :] + live[: r % max(len(live), 1)]:
            for _ in range(args.steps):
                step(v, next(batches), device)
        print(f"  round {r + 1}/{args.rounds} (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    rows = []
    for v in variants:
        row = {"device": device, "size": "base" if base else "small", "variant": v.name}
        if v.error:
            rows.append(row | {"error": v.error})
            continue
        med = benchlib.median(v.times)
        with_collate = benchlib.median([a + b for a, b in zip(v.times, v.collate, strict=True)])
        hours = PAPER_STEPS * with_collate / 3600
        rows.append(
            row
            | {
                "steps/s": 1 / med,
                "tokens/s": benchlib.median(v.tokens) / med,
                "step ms": 1000 * med,
                "collate ms": 1000 * benchlib.median(v.collate),
                "31,250 steps h": hours,
                "times_s": [round(t, 4) for t in v.times],
            }
        )
    return rows


def arguments() -> argparse.Namespace:
    p = benchlib.parser("train_step", __doc__, "threads", "rounds", rounds=4)
    positive = benchlib.positive_int
    p.add_argument("--size", choices=["auto", "small", "base"], default="auto")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--max-length", type=positive, default=32)
    p.add_argument("--cpu-variants", default=",".join(CPU_VARIANTS))
    p.add_argument("--gpu-variants", default=",".join(GPU_VARIANTS))
    p.add_argument("--generator", type=Path, default=None, help="fitted MLM generator folder")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--steps", type=positive, default=3, help="steps per variant per round")
    args = p.parse_args()
    if args.generator is None and (ROOT / "runs" / "generator-minilm").is_dir():
        args.generator = ROOT / "runs" / "generator-minilm"
    return args


def quiet_trainer() -> None:
    """The trainer importable (else a skip), and its and transformers' chatter off."""
    try:
        import diffcse_train.trainer  # noqa: F401
    except ImportError as exc:
        raise BenchSkip(
            f"the trainer is not importable ({exc}); pip install -e '.[train]'"
        ) from None
    logging.getLogger("diffcse_train").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main() -> None:
    args = arguments()
    quiet_trainer()
    devs = benchlib.devices(args.device)
    info = benchlib.machine(args.threads)
    print(benchlib.describe(info))
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffcse-trainstep-") as tmpdir:
        for device in devs:
            size = args.size if args.size != "auto" else ("small" if device == "cpu" else "base")
            rows += run_device(device, size, args, Path(tmpdir) / device)
    if "cuda" not in devs:
        rows.append(
            {
                "device": "cuda",
                "size": "base",
                "variant": "all",
                "error": "not measured: no CUDA device in this run",
            }
        )
    result = {
        "benchmark": "train_step",
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "paper": {"steps": PAPER_STEPS, "hours_2080ti": PAPER_HOURS},
        "rows": rows,
        "machine": benchlib.finish_machine(info),
    }
    cols = ["device", "size", "variant", "steps/s", "tokens/s", "step ms", "collate ms"]
    print(benchlib.table([r for r in rows if "error" not in r], cols + ["31,250 steps h"]))
    for r in rows:
        if "error" in r:
            print(f"  {r['device']} {r['variant']}: {r['error']}")
    print(
        f"paper: {PAPER_STEPS:,} steps in {PAPER_HOURS[0]:.0f}-{PAPER_HOURS[1]:.0f} h on one 2080Ti"
    )
    print(f"wrote {benchlib.write_json(args.out, result)}")


if __name__ == "__main__":
    benchlib.run_main(main)

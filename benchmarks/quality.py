"""The method's effect: SimCSE vs DiffCSE from the same start, scored through exported ONNX.

Three runs share the initial encoder (all-MiniLM-L6-v2), data (builtin:wiki_en), seed,
learning rate, batch size and step budget, and differ only in the objective:

  (a) simcse           lambda_weight 0 (no discriminator)
  (b) diffcse-mlm      DiffCSE, masked tokens filled by a fitted masked-LM generator: the
                       demo config's runs/generator-minilm (or --generator DIR), which the
                       trainer fits first if it does not exist (fit_generator: true)
  (c) diffcse-replace  DiffCSE with the generator-free edit (random-token replacement)
  (d) a lambda sweep   diffcse-mlm@LAMBDA for each --sweep value (paper Table 8 swept it too)

Every run uses the model's native pooling (pooling: auto, mean for all-MiniLM-L6-v2), so
the initial model is the real baseline, scored with the vector it was trained to give.

Each run is `diffcse-train --config configs/demo_cpu.yaml --set ...` with evaluation only
at the end (so best/ is the final step: no selection on STS-B dev); best/ is exported with
`diffcse-export` (numeric parity gate; its STS parity is skipped, the scores below are the
check) and scored by diffcse_runtime on STS-B dev and SICK-R trial. The initial model is
exported and scored the same way. The RTD head's accuracy at the first and last logged steps is read
from metrics.jsonl: a discriminator that learns nothing means a broken RTD path.

CPU uses the small config (batch 32, 40 steps by default: about 20 min on 2 idle cores);
with CUDA it uses a larger one (batch 64, 500 steps). Everything lands in
benchmarks/.cache/quality/ (git-ignored).

`--score trainer` scores no export at all: every run evaluates STS-B dev and SICK-R trial
itself every `--eval-steps` (fp32, through diffcse_runtime.sts, the trainer's own dev
evaluation) without selecting on them; the row is the last step, and the whole trajectory
is kept (the initial model is each run's step 0). `--jobs N` trains N runs at once (a GPU
is mostly idle with one small model), `--deadline S` starts no new run after S seconds, and
the JSON is rewritten after every finished run, so a run cut short still reports.

Run: python -m benchmarks.quality [--generator DIR] [--steps N] [--seeds 42,43]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks import benchlib
from benchmarks.benchlib import CACHE_DIR, ROOT, BenchSkip, minilm_dir
from benchmarks.models import export, minilm_variant

RUNS = ("simcse", "diffcse-mlm", "diffcse-replace")
CONFIG = ROOT / "configs" / "demo_cpu.yaml"
LAMBDA = 0.005  # the paper's STS setting, for diffcse-mlm and diffcse-replace
SETTINGS = {  # device -> (batch size, steps, learning rate)
    "cpu": (32, 40, 3e-5),
    "cuda": (64, 500, 3e-5),
}


def run_overrides(name: str, generator: Path) -> list[str]:
    """Overrides of run `name`: one of RUNS, or diffcse-mlm@LAMBDA for the sweep."""
    base, _, weight = name.partition("@")
    lam = float(weight) if weight else LAMBDA
    if base == "simcse":
        return ["lambda_weight=0", "augmentation=none"]
    if base == "diffcse-mlm":
        return ["augmentation=mlm", f"generator_name_or_path={generator}", f"lambda_weight={lam}"]
    return ["augmentation=replace", f"lambda_weight={lam}"]


def train(name: str, overrides: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "diffcse_train", "--config", str(CONFIG), "--overwrite", "--quiet"]
    for item in [*overrides, f"output_dir={out}"]:
        cmd += ["--set", item]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: diffcse-train failed: {proc.stderr.strip()[-400:]}")
    if not (out / "best").is_dir():
        raise RuntimeError(f"{name}: diffcse-train wrote no {out / 'best'}")
    return time.perf_counter() - t0


def records(metrics: Path, kind: str) -> list[dict]:
    """The run's metrics.jsonl records of one kind ("train" or "eval"), in order."""
    if not metrics.is_file():
        return []
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("kind") == kind]


def rtd_trace(metrics: Path) -> dict:
    """RTD loss/accuracy at the first and last train records (None for SimCSE)."""
    train = [r for r in records(metrics, "train") if r.get("rtd_acc") is not None]
    if not train:
        return {}
    first, last = train[0], train[-1]
    keys = ("loss_rtd", "rtd_acc", "rtd_rep_acc", "rtd_fix_acc", "replaced_frac")
    return {f"{k}_first": first.get(k) for k in keys} | {f"{k}_last": last.get(k) for k in keys}


def eval_trace(metrics: Path) -> list[dict]:
    """The trainer's dev evaluations: [{step, stsb_dev, sick_trial}], step 0 first."""
    keys = ("step", "stsb_dev", "sick_trial")
    return [{k: r.get(k) for k in keys} for r in records(metrics, "eval")]


def trainer_scores(trace: list[dict]) -> dict:
    """The last evaluation is the run's score (no selection); step 0 is the initial model."""
    if not trace or trace[-1]["step"] == 0:
        raise RuntimeError("the run logged no evaluation after step 0")
    first, last = trace[0], trace[-1]
    out = {"stsb_dev": last["stsb_dev"], "sick_trial": last["sick_trial"]}
    if first["step"] == 0:
        out |= {"initial_stsb_dev": first["stsb_dev"], "initial_sick_trial": first["sick_trial"]}
    return out | {"trace": trace}


def torch_encoder(checkpoint: Path):
    """best/ in PyTorch with its own pooling: the export parity gate's reference path."""
    from diffcse_export import graph, validate

    ckpt = graph.load_checkpoint(checkpoint)
    module, _ = graph.embedding_modules(ckpt, with_projector=False)
    max_len = graph.resolve_max_seq_length(ckpt, None)
    return validate.torch_encode_fn(module, ckpt.tokenizer, max_len)


def score(model_dir: Path, data: Path, with_torch: bool = False) -> dict:
    """STS-B dev and SICK-R trial: an exported model directory through the runtime, or
    (with_torch) a checkpoint through PyTorch."""
    from diffcse_runtime import Encoder
    from diffcse_runtime.sts import evaluate
    from diffcse_train.evaluation import TASK_KEYS  # the trainer's metric keys, so rows compare

    encoder = torch_encoder(model_dir) if with_torch else Encoder(model_dir)
    out = {}
    for task, key in TASK_KEYS.items():
        try:
            out[key] = evaluate(encoder, data, [task], split="dev").scores[task].spearman
        except Exception as exc:  # e.g. SICK absent: say so in the row
            out[key] = None
            out[f"{key}_error"] = str(exc)
    return out


def fit_report(generator: Path) -> dict | None:
    path = generator / "fit_report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def best_step(run_dir: Path) -> int | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()).get("best_step") if path.is_file() else None


def one_run(name: str, seed: int, common: list[str], generator: Path, args, data: Path) -> dict:
    """Train, export and score run `name` with `seed`; errors land in the row.

    A finished run's row is kept in its folder (row.json, with the overrides that made it)
    and reused by a later invocation with the same overrides, so the experiment can be run
    in parts (e.g. the generator-free runs while the generator is still being fitted).
    """
    row = {"run": name, "seed": seed, "steps": args.steps}
    out = args.work / f"{name}-s{seed}"
    overrides = common + [f"seed={seed}"] + run_overrides(name, generator)
    cached = out / "row.json"
    if cached.is_file():
        saved = json.loads(cached.read_text())
        if saved.get("overrides") == overrides and not saved["row"].get("error"):
            print(f"  {name} seed {seed}: reused {cached}", file=sys.stderr, flush=True)
            return saved["row"]
    try:
        row["train_s"] = train(name, overrides, out)
        row["best_step"] = best_step(out)
        if args.score == "trainer":
            row |= trainer_scores(eval_trace(out / "metrics.jsonl"))
        elif args.score == "torch":
            row |= score(out / "best", data, with_torch=True)
        else:
            no_sts = args.work / "no-sts"  # export's STS parity is redundant: scored below
            no_sts.mkdir(parents=True, exist_ok=True)
            extra = ("--sts-data", str(no_sts))
            onnx_dir = args.work / f"{name}-s{seed}-onnx"
            export(out / "best", onnx_dir, variants=("fp32",), extra=extra)
            row |= score(onnx_dir, data)
        row |= rtd_trace(out / "metrics.jsonl")
        cached.write_text(json.dumps({"overrides": overrides, "row": row}, indent=2))
    except (RuntimeError, BenchSkip) as exc:
        row["error"] = str(exc)
    print(f"  {name} seed {seed}: {row}", file=sys.stderr, flush=True)
    return row


def _stats(values: list[float]) -> dict:
    """mean, sample standard deviation and range of a few per-seed figures."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def mean_rows(rows: list[dict], names: list[str]) -> list[dict]:
    """Per run: mean, std and range over seeds of each score, its delta to the initial
    model and its paired (same seed) difference to SimCSE."""
    simcse = {r["seed"]: r for r in rows if r["run"] == "simcse" and r.get("stsb_dev") is not None}
    out = []
    for name in names:
        done = [r for r in rows if r["run"] == name and r.get("stsb_dev") is not None]
        if not done:
            continue
        row = {"run": name, "seeds": len(done)}
        for key in ("stsb_dev", "sick_trial", "stsb_dev delta", "sick_trial delta"):
            values = [r[key] for r in done if r.get(key) is not None]
            if values:
                st = _stats(values)
                row[key], row[f"{key} std"] = st["mean"], st["std"]
                row[f"{key} range"] = st["max"] - st["min"]
        if name != "simcse":
            for key in ("stsb_dev", "sick_trial"):
                diffs = [
                    r[key] - simcse[r["seed"]][key]
                    for r in done
                    if r["seed"] in simcse and r.get(key) is not None
                ]
                if diffs:
                    st = _stats(diffs)
                    row[f"{key} vs simcse"], row[f"{key} vs simcse std"] = st["mean"], st["std"]
        out.append(row)
    return out


def arguments() -> argparse.Namespace:
    p = benchlib.parser("quality", __doc__, "data")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument(
        "--generator",
        type=Path,
        default=ROOT / "runs" / "generator-minilm",
        help="masked-LM generator for (b); fitted there first if it does not exist",
    )
    p.add_argument("--steps", type=benchlib.positive_int, help="step budget of every run")
    p.add_argument("--batch-size", type=benchlib.positive_int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--seeds", default="42,43,44", help="comma-separated: every run once per seed")
    p.add_argument(
        "--sweep", default="", help="lambda values for extra diffcse-mlm@LAMBDA runs, e.g. 0.05,0.5"
    )
    p.add_argument("--work", type=Path, default=CACHE_DIR / "quality")
    p.add_argument(
        "--score",
        choices=("onnx", "torch", "trainer"),
        default="onnx",
        help="score each run's best/ exported through the runtime (onnx), or in PyTorch with "
        "its own pooling (torch: the export parity gate's reference, no export per run), or "
        "read the trainer's own dev evaluations (trainer: every --eval-steps, no export)",
    )
    p.add_argument("--eval-steps", type=benchlib.positive_int, help="with --score trainer")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    p.add_argument("--jobs", type=benchlib.positive_int, default=1, help="runs at the same time")
    p.add_argument("--deadline", type=float, default=None, help="seconds: no new run after")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    args = p.parse_args()
    args.runs = args.runs.split(",")
    args.runs += [f"diffcse-mlm@{x.strip()}" for x in args.sweep.split(",") if x.strip()]
    bad = sorted({n.partition("@")[0] for n in args.runs} - set(RUNS))
    if bad:
        p.error(f"--runs: unknown {bad}; choose from {', '.join(RUNS)}")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: {args.seeds!r} is not a comma-separated list of whole numbers")
    return args


def common_overrides(args, device: str, bs: int, lr: float, data: Path) -> list[str]:
    """Every run's shared settings: only the objective and the seed differ between rows."""
    common = [
        f"max_steps={args.steps}",
        f"batch_size={bs}",
        f"learning_rate={lr}",
        f"save_steps={args.steps}",
        f"device={device}",
        "precision=" + (args.precision or ("bf16" if device == "cuda" else "fp32")),
        "export_dir=null",  # exported and scored below (or read from the trainer's log)
        "compare_with=none",  # each objective is its own run here
        "select_on=",  # with --score trainer nothing is selected (keep_initial false)
    ]
    if args.score == "trainer":  # evaluated along the way, never selected on
        common += [
            f"eval_steps={args.eval_steps or args.steps}",
            f"eval_data_dir={data}",
            "eval_tasks=STSBenchmark,SICKRelatedness",
            "keep_initial=false",
        ]
    else:  # no selection on STS-B dev: best/ is the last step, scored below
        common += [f"eval_steps={args.steps}", "eval_data_dir=null"]
    return common + list(args.set)


def run_all(jobs: list[tuple[str, int]], common, generator, args, data, publish) -> list[dict]:
    """Train (`--jobs` at a time) and score every (name, seed); `publish` sees each new row."""
    started, rows, lock = time.perf_counter(), [], threading.Lock()

    def work(job: tuple[str, int]) -> dict | None:
        if args.deadline is not None and time.perf_counter() - started > args.deadline:
            return None
        row = one_run(job[0], job[1], common, generator, args, data)
        with lock:
            rows.append(row)
            publish(rows)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(work, jobs))
    order = {job: i for i, job in enumerate(jobs)}
    return sorted(rows, key=lambda r: order[(r["run"], r["seed"])])


def initial_row(args, data: Path, rows: list[dict]) -> dict:
    """The input model's scores: the runs' own step 0 (trainer), or scored here."""
    if args.score == "trainer":
        done = [r for r in rows if r.get("initial_stsb_dev") is not None]
        first = done[0] if done else {}
        return {
            "run": "initial",
            "steps": 0,
            "stsb_dev": first.get("initial_stsb_dev"),
            "sick_trial": first.get("initial_sick_trial"),
        }
    initial = minilm_variant("fp32") if args.score == "onnx" else minilm_dir()
    return {"run": "initial", "steps": 0, **score(initial, data, args.score == "torch")}


@dataclass
class Experiment:
    """What every run of one invocation shares, and the result file they make together."""

    args: argparse.Namespace
    data: Path
    common: list[str]  # the config overrides every run shares
    generator: Path
    fitted_here: bool  # the generator does not exist yet: the first diffcse-mlm run fits it
    info: dict
    initial: dict | None = None  # scored once (onnx, torch); the trainer: each run's step 0

    def result(self, rows: list[dict]) -> dict:
        """The JSON of the rows so far, each with its delta to the initial model."""
        init = dict(self.initial) if self.initial else initial_row(self.args, self.data, rows)
        for r in rows:
            for key in ("stsb_dev", "sick_trial"):
                if r.get(key) is not None and init.get(key) is not None:
                    r[f"{key} delta"] = r[key] - init[key]
        return {
            "benchmark": "quality",
            "config": {
                "base": str(CONFIG.relative_to(ROOT)),
                "overrides": self.common,
                "seeds": self.args.seeds,
                "score": self.args.score,
                "jobs": self.args.jobs,
            },
            "generator": {
                "path": str(self.generator),
                "fitted_during_this_run": self.fitted_here,
                "report": fit_report(self.generator),
            },
            "rows": [init, *rows],
            "means": mean_rows(rows, self.args.runs),
            "machine": benchlib.finish_machine(dict(self.info)),
        }


def plan(args: argparse.Namespace) -> Experiment:
    """The device's settings (the larger config where CUDA exists), overridden by the
    options, and the overrides every run shares."""
    data = benchlib.sts_data_dir(args.data)
    device = benchlib.devices(args.device)[-1]
    bs, steps, lr = SETTINGS[device]
    args.steps = args.steps or steps
    common = common_overrides(args, device, args.batch_size or bs, args.learning_rate or lr, data)
    generator = args.generator.resolve()
    fitted_here = not generator.exists() and any(n.startswith("diffcse-mlm") for n in args.runs)
    info = benchlib.machine(threads=len(os.sched_getaffinity(0)), device=device)
    return Experiment(args, data, common, generator, fitted_here, info)


def job_order(exp: Experiment) -> list[tuple[str, int]]:
    """Every (run, seed). Runs trained in parallel would all fit a missing generator: the
    first diffcse-mlm run fits it here first (its row is kept and reused)."""
    jobs = [(name, seed) for seed in exp.args.seeds for name in exp.args.runs]
    if exp.fitted_here and exp.args.jobs > 1:
        first = next(j for j in jobs if j[0].startswith("diffcse-mlm"))
        jobs = [first] + [j for j in jobs if j != first]
        one_run(first[0], first[1], exp.common, exp.generator, exp.args, exp.data)
    return jobs


def report(result: dict) -> None:
    cols = ["run", "seed", "steps", "stsb_dev", "stsb_dev delta", "sick_trial"]
    cols += ["sick_trial delta", "rtd_acc_first", "rtd_acc_last", "rtd_rep_acc_last"]
    cols += ["replaced_frac_last", "train_s"]
    print(benchlib.table(result["rows"], cols))
    if result["means"]:
        print()
        keys = ["seeds", "stsb_dev", "stsb_dev std", "stsb_dev delta", "stsb_dev vs simcse"]
        keys += ["stsb_dev vs simcse std", "sick_trial", "sick_trial std", "sick_trial delta"]
        keys += ["sick_trial vs simcse", "sick_trial vs simcse std"]
        print(benchlib.table(result["means"], ["run", *keys]))
    for r in result["rows"]:
        if r.get("error"):
            print(f"  {r['run']}: {r['error']}")


def main() -> None:
    exp = plan(arguments())
    print(benchlib.describe(exp.info))
    if exp.args.score != "trainer":  # the initial model first, so a broken scorer fails early
        exp.initial = initial_row(exp.args, exp.data, [])
        print(f"  initial: {exp.initial}", file=sys.stderr, flush=True)

    def publish(rows: list[dict]) -> None:  # after every run: a run cut short still reports
        benchlib.write_json(exp.args.out, exp.result(rows))

    rows = run_all(job_order(exp), exp.common, exp.generator, exp.args, exp.data, publish)
    result = exp.result(rows)
    report(result)
    print(f"wrote {benchlib.write_json(exp.args.out, result)}")


if __name__ == "__main__":
    benchlib.run_main(main)

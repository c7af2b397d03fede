"""Objectives at the main job's budget, under the paper's selection protocol.

Every setting is `diffcse-train --config configs/demo_cpu.yaml` plus its overrides: the
same start (all-MiniLM-L6-v2, mean pooling), data, batch, learning rate and steps; dev
scores every 25 steps; best/ is the step with the best STS-B dev (`select_on`), the input
model competing (`keep_initial`). SICK-R trial at that step is the second opinion. Rows
report mean, standard deviation and range over seeds, the selected steps, and D's
replaced-token recall at the last step (is D learning the generator's edits?).

Settings (`--settings`, comma-separated; each is one row):
  simcse            lambda_weight 0, no augmentation
  diffcse           DiffCSE-mlm, the paper's single learning rate (lambda 0.005, the
                    fitted generator)
  diffcse-dlr       ... with D's own learning rate (discriminator_learning_rate, --d-lr;
                    the demo config's setting)
  diffcse-dwarm     ... D warm-started alone for --d-warm steps at that rate first
  diffcse-lamwarm   ... lambda ramped from 0 over the first half of the steps, D at --d-lr
  supervised        supervised SimCSE on triplets from SICK_train + STS-B train
                    (benchmarks.supervised_data; never dev, trial or test)

Runs land in benchmarks/.cache/objectives/SETTING-sSEED; a finished run (summary.json)
is read, not retrained, so an interrupted sweep continues. `--jobs 2` trains two runs at
once with one thread each (on 2 cores about as fast in total as one run with two).

Run: python -m benchmarks.objectives --settings simcse,diffcse --seeds 42,43,44 --jobs 2
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import benchlib
from benchmarks.benchlib import CACHE_DIR, ROOT

CONFIG = ROOT / "configs" / "demo_cpu.yaml"
COMMON = [  # the main job's protocol; export and the table are not needed here
    "export_dir=null", "compare_with=none", "fit_generator=false",
    "eval_tasks=STSBenchmark,SICKRelatedness", "select_on=STSBenchmark",
    "keep_initial=true", "gain_on_every_task=false",
]  # fmt: skip


def overrides(setting: str, args) -> list[str]:
    """The --set items that make `setting` out of the demo config."""
    d_lr = f"discriminator_learning_rate={args.d_lr}"
    table = {
        "simcse": ["lambda_weight=0", "augmentation=none"],
        "diffcse": ["discriminator_learning_rate=null"],  # the paper's one rate
        "diffcse-dlr": [d_lr],
        "diffcse-dwarm": [d_lr, f"discriminator_warmup_steps={args.d_warm}"],
        "diffcse-lamwarm": [d_lr, f"lambda_warmup_steps={args.steps // 2}"],
        "supervised": [
            "objective=supervised", f"train_file={args.triplets}", "lambda_weight=0",
            "augmentation=none", "epochs=2",  # 2,705 rows make 84 steps an epoch
        ],
    }  # fmt: skip
    if setting not in table:
        raise SystemExit(f"--settings: unknown {setting!r}; choose from {', '.join(table)}")
    return table[setting]


def run_folder(setting: str, seed: int) -> Path:
    return CACHE_DIR / "objectives" / f"{setting}-s{seed}"


def train(setting: str, seed: int, args) -> Path:
    """Train one (setting, seed) unless its summary exists; return the run folder."""
    out = run_folder(setting, seed)
    if (out / "summary.json").is_file():
        return out
    cmd = [sys.executable, "-m", "diffcse_train", "--config", str(CONFIG), "--quiet"]
    cmd += ["--overwrite"] if out.exists() else []
    items = [*COMMON, *overrides(setting, args), f"output_dir={out}", f"seed={seed}"]
    items += [f"max_steps={args.steps}", f"learning_rate={args.lr}"]
    items += [f"generator_name_or_path={args.generator}", f"eval_data_dir={args.data}"]
    for item in items:
        cmd += ["--set", item]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{setting} seed {seed}: {proc.stderr.strip()[-400:]}")
    (out / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return out


def read_run(out: Path) -> dict:
    """Selected step, its dev scores, the input's, and D's last replaced-token recall."""
    from diffcse_train.report import read_metrics  # the trainer's own reader

    rows = read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if r["kind"] == "eval"]
    trains = [r for r in rows if r["kind"] == "train"]
    best = json.loads((out / "best" / "metrics.json").read_text())
    chosen = next(r for r in evals if r["step"] == best["step"])
    wall = out / "wall_seconds.txt"
    return {
        "step": best["step"],
        "stsb_dev": chosen["stsb_dev"],
        "sick_trial": chosen["sick_trial"],
        "initial_stsb_dev": evals[0]["stsb_dev"],
        "initial_sick_trial": evals[0]["sick_trial"],
        "rtd_recall_last": trains[-1].get("rtd_rep_acc"),
        "rtd_acc_last": trains[-1].get("rtd_acc"),
        "curve": [(r["step"], r["stsb_dev"], r["sick_trial"]) for r in evals],
        "wall_seconds": float(wall.read_text()) if wall.is_file() else None,
    }


def spread(values: list[float]) -> dict:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values)}


def summarise(setting: str, runs: dict[int, dict]) -> dict:
    """One table row: mean ± sd over seeds of the gain on each dev set."""
    row = {"setting": setting, "seeds": sorted(runs), "runs": runs}
    for key in ("stsb_dev", "sick_trial"):
        row[f"{key}_gain"] = spread([r[key] - r[f"initial_{key}"] for r in runs.values()])
        row[key] = spread([r[key] for r in runs.values()])
    recalls = [r["rtd_recall_last"] for r in runs.values() if r["rtd_recall_last"] is not None]
    row["rtd_recall_last"] = statistics.fmean(recalls) if recalls else None
    row["steps_selected"] = [runs[s]["step"] for s in sorted(runs)]
    return row


def show(rows: list[dict]) -> str:
    def pm(d: dict) -> str:
        return f"{d['mean']:+.2f} ± {d['sd']:.2f}"

    lines = []
    for r in rows:
        recall = "-" if r["rtd_recall_last"] is None else f"{r['rtd_recall_last']:.2f}"
        lines.append(
            {
                "setting": r["setting"], "seeds": len(r["seeds"]),
                "STS-B dev": f"{r['stsb_dev']['mean']:.2f}", "gain": pm(r["stsb_dev_gain"]),
                "SICK-R trial": f"{r['sick_trial']['mean']:.2f}",
                "gain ": pm(r["sick_trial_gain"]), "steps": r["steps_selected"],
                "D recall": recall,
            }
        )  # fmt: skip
    return benchlib.table(lines, list(lines[0]))


def arguments():
    p = benchlib.parser("objectives", __doc__, "data")
    p.add_argument("--settings", default="simcse,diffcse")
    p.add_argument("--seeds", type=benchlib.positive_ints, default=[42])
    p.add_argument("--steps", type=benchlib.positive_int, default=100)
    p.add_argument("--lr", type=benchlib.positive_float, default=3e-5)
    p.add_argument("--d-lr", type=benchlib.positive_float, default=3e-4)
    p.add_argument("--d-warm", type=benchlib.positive_int, default=50)
    p.add_argument("--generator", default=str(ROOT / "runs" / "generator-minilm"))
    p.add_argument("--triplets", default=str(CACHE_DIR / "triplets.csv"))
    p.add_argument("--jobs", type=benchlib.positive_int, default=1)
    p.add_argument("--threads", type=benchlib.positive_int, default=None)
    p.add_argument("--read-only", action="store_true", help="tabulate finished runs only")
    return p.parse_args()


def main() -> None:
    args = arguments()
    args.data = benchlib.sts_data_dir(args.data)
    args.threads = args.threads or max(1, len(os.sched_getaffinity(0)) // args.jobs)
    info = benchlib.machine(args.threads)
    print(benchlib.describe(info))
    settings = [s for s in args.settings.split(",") if s]
    jobs = [(s, seed) for s in settings for seed in args.seeds]
    for s in settings:
        overrides(s, args)  # unknown names fail before any training
    if args.read_only:  # tabulate the finished runs, train nothing
        jobs = [(s, seed) for s, seed in jobs if (run_folder(s, seed) / "summary.json").is_file()]
        folders = [run_folder(s, seed) for s, seed in jobs]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            folders = list(pool.map(lambda job: train(*job, args), jobs))
    runs: dict[str, dict[int, dict]] = {}
    for (setting, seed), out in zip(jobs, folders, strict=True):
        runs.setdefault(setting, {})[seed] = read_run(out)
    rows = [summarise(s, runs[s]) for s in settings if s in runs]
    print(show(rows))
    result = {
        "benchmark": "objectives", "model": "all-MiniLM-L6-v2", "steps": args.steps,
        "learning_rate": args.lr, "d_lr": args.d_lr, "d_warm": args.d_warm,
        "protocol": COMMON, "rows": rows, "machine": benchlib.finish_machine(info),
    }  # fmt: skip
    print(f"wrote {benchlib.write_json(args.out, result)}")


if __name__ == "__main__":
    benchlib.run_main(main)

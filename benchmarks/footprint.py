"""Install footprint: disk size of a fresh venv with the base install vs with the train extra.

Three venvs are created in a temporary folder (pip resolves from the configured index, the
local mirror here): an empty venv (pip itself), `pip install .` (the runtime: numpy,
onnxruntime, tokenizers, click, tqdm) and `pip install torch==2.13.0 && pip install
".[train]"` (the CPU torch build first, as README says). Sizes come from `du`; the
packages' own size is the venv minus the empty one. Target (issue 5): base <= 1/10 of train.

Run: python -m benchmarks.footprint [--keep DIR]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import benchlib
from benchmarks.benchlib import ROOT, BenchSkip

TORCH_PIN = "torch==2.13.0"
PY = shutil.which("python3") or sys.executable


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def make_venv(path: Path, installs: list[list[str]]) -> float:
    """Create a venv and run each pip install; returns the install seconds."""
    subprocess.run([PY, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir"]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off")
    t0 = time.perf_counter()
    for args in installs:
        proc = subprocess.run(pip + args, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise BenchSkip(f"pip install {' '.join(args)} failed: {proc.stderr.strip()[-400:]}")
    return time.perf_counter() - t0


def top_packages(venv: Path, n: int = 6) -> list[tuple[str, float]]:
    site = next(venv.glob("lib/python*/site-packages"))
    sizes = [(p.name, du_bytes(p) / 2**20) for p in site.iterdir() if p.is_dir()]
    return sorted(sizes, key=lambda x: -x[1])[:n]


def main() -> None:
    p = benchlib.parser("footprint", __doc__)
    p.add_argument("--keep", type=Path, default=None, help="create the venvs here and keep them")
    args = p.parse_args()
    info = benchlib.machine(threads="n/a")
    print(benchlib.describe(info))
    tmp = Path(tempfile.mkdtemp(prefix="diffcse-footprint-", dir=args.keep))
    plans = {
        "empty venv": [],
        "base (pip install .)": [["."]],
        "train (torch CPU + .[train])": [[TORCH_PIN], [".[train]"]],
    }
    rows = []
    try:
        for i, (name, installs) in enumerate(plans.items()):
            venv = tmp / f"venv{i}"
            seconds = make_venv(venv, installs)
            size = du_bytes(venv)
            rows.append(
                {"venv": name, "MiB": size / 2**20, "install s": seconds, "top": top_packages(venv)}
            )
            print(f"  {name}: {size / 2**20:.0f} MiB", file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    empty = rows[0]["MiB"]
    for r in rows:
        r["packages MiB"] = r["MiB"] - empty
    base, train = rows[1], rows[2]
    for r in rows[1:]:
        r["/ train"] = r["packages MiB"] / train["packages MiB"]
    result = {
        "benchmark": "footprint",
        "rows": rows,
        "base_over_train": base["packages MiB"] / train["packages MiB"],
        "target": "<= 0.10",
        "machine": benchlib.finish_machine(info),
    }
    print(benchlib.table(rows, ["venv", "MiB", "packages MiB", "/ train", "install s"]))
    for r in rows[1:]:
        print(f"  largest in {r['venv']}: " + ", ".join(f"{n} {m:.0f}" for n, m in r["top"]))
    print(f"wrote {benchlib.write_json(args.out, result)}")


if __name__ == "__main__":
    benchlib.run_main(main)

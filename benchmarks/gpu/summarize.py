"""Print the GPU quality table of benchmarks/notes/quality-and-training.md from the JSON that
quality.sh and demo_grid.sh wrote.

    python -m benchmarks.gpu.summarize benchmarks/results/gpu
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def deltas(row: dict) -> tuple[float, float]:
    return row["stsb_dev delta"], row["sick_trial delta"]


def summarize(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"][1:] if r.get("stsb_dev") is not None]
    names = list(dict.fromkeys(r["run"] for r in rows))
    simcse = {r["seed"]: r for r in rows if r["run"] == "simcse"}
    out = []
    for name in names:
        mine = sorted((r for r in rows if r["run"] == name), key=lambda r: r["seed"])
        cells = []
        for key in ("stsb_dev delta", "sick_trial delta"):
            vals = [r[key] for r in mine]
            per_seed = " / ".join(f"{v:+.2f}" for v in vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):+.2f} ± {sd:.2f} ({per_seed})")
        for key in ("stsb_dev", "sick_trial"):
            paired = [r[key] - simcse[r["seed"]][key] for r in mine if r["seed"] in simcse]
            if name == "simcse" or not paired:
                cells.append("–")
            else:
                sd = statistics.stdev(paired) if len(paired) > 1 else 0.0
                cells.append(f"{statistics.mean(paired):+.2f} ± {sd:.2f}")
        rtd = [r.get("rtd_acc_last") for r in mine if r.get("rtd_acc_last") is not None]
        rep = [r.get("rtd_rep_acc_last") for r in mine if r.get("rtd_rep_acc_last") is not None]
        cells.append(f"{statistics.mean(rtd):.2f} / {statistics.mean(rep):.2f}" if rtd else "–")
        out.append(f"| {path.stem} | {name} | {len(mine)} | " + " | ".join(cells) + " |")
    return out


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu")
    print(
        "| setting | objective | seeds | STS-B dev delta (per seed) | SICK-R trial delta "
        "(per seed) | STS-B vs SimCSE (paired) | SICK-R vs SimCSE (paired) | RTD acc / "
        "replaced-token recall (last step) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(folder.glob("*.json")):
        if path.name != "generators.json":
            print("\n".join(summarize(path)))


if __name__ == "__main__":
    main()

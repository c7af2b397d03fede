"""Cold start: wall time and peak RSS of a fresh process that embeds one text.

Contenders, each a new Python process (page cache warm: one untimed round first):
  ours-cli       diffcse-embed one.txt --model DIR -o out.npy
  ours-python    python -c "from diffcse_runtime import Encoder; Encoder(DIR).encode(['x'])"
  torch-script   the same file -> .npy job with torch + transformers (AutoModel, [CLS])
  torch-python   python -c "import torch, transformers; AutoModel...(['x'])"
  st-python      python -c "SentenceTransformer(DIR).encode(['x'])" (sentence-transformers)

Rounds are interleaved round-robin; medians of wall time and of peak RSS (the child's own
ru_maxrss from os.wait4) and the ratio to the torch path are reported. Target (issue 5):
the runtime's cold start <= 1/5 of the torch path.

Run: python -m benchmarks.cold_start [--rounds 7] [--model DIR]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import benchlib
from benchmarks.models import given_or_exported

TORCH_EMBED = """
import sys, numpy as np, torch
from transformers import AutoModel, AutoTokenizer
src, path, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(src)
model = AutoModel.from_pretrained(src).eval()
texts = open(path, encoding="utf-8").read().splitlines()
with torch.inference_mode():
    emb = model(**tok(texts, padding=True, truncation=True, return_tensors="pt"))
np.save(out, emb.last_hidden_state[:, 0].numpy())
"""
TORCH_PYTHON = """
import sys, torch
from transformers import AutoModel, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModel.from_pretrained(sys.argv[1]).eval()
with torch.inference_mode():
    model(**tok(["x"], return_tensors="pt")).last_hidden_state[:, 0]
"""
OURS_PYTHON = "import sys; from diffcse_runtime import Encoder; Encoder(sys.argv[1]).encode(['x'])"
ST_PYTHON = (
    "import sys; from sentence_transformers import SentenceTransformer; "
    "SentenceTransformer(sys.argv[1], device='cpu').encode(['x'])"
)


def timed_run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process; raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} ... exited {proc.returncode}: {err.strip()[-300:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def commands(model_dir: Path, hf_dir: Path, tmp: Path) -> dict[str, list[str]]:
    py = sys.executable
    line = tmp / "one.txt"
    line.write_text("A man is playing a guitar.\n", encoding="utf-8")
    embed = Path(py).parent / "diffcse-embed"
    out = {
        "ours-cli": [str(embed), str(line), "--model", str(model_dir), "-o", str(tmp / "a.npy")],
        "ours-python": [py, "-c", OURS_PYTHON, str(model_dir)],
        "torch-script": [py, "-c", TORCH_EMBED, str(hf_dir), str(line), str(tmp / "b.npy")],
        "torch-python": [py, "-c", TORCH_PYTHON, str(hf_dir)],
    }
    if "sentence-transformers" in benchlib.library_versions():
        out["st-python"] = [py, "-c", ST_PYTHON, str(hf_dir)]
    return out


def main() -> None:
    args = benchlib.parser("cold_start", __doc__, "model", "rounds", rounds=7).parse_args()
    model_dir = given_or_exported(args.model)
    hf_dir = benchlib.minilm_dir()
    info = benchlib.machine(threads="library default (all cores)")
    print(benchlib.describe(info))
    if "cuda" in benchlib.devices(args.device):
        print("# cold start is measured on CPU: a server's first request, no GPU init")
    with tempfile.TemporaryDirectory(prefix="diffcse-cold-") as tmpdir:
        cmds = commands(model_dir, hf_dir, Path(tmpdir))
        names = list(cmds)
        runs = {n: [] for n in names}
        for rep in range(args.rounds + 1):  # round 0 warms the page cache, untimed
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                wall, rss = timed_run(cmds[name])
                if rep:
                    runs[name].append((wall, rss))
            print(f"  round {rep}/{args.rounds} (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    rows = []
    med = {
        n: (benchlib.median([w for w, _ in r]), benchlib.median([m for _, m in r]))
        for n, r in runs.items()
    }
    for name in names:
        base = "torch-script" if name == "ours-cli" else "torch-python"
        rows.append(
            {
                "contender": name,
                "wall s": med[name][0],
                "peak RSS MiB": med[name][1],
                "wall / torch": med[name][0] / med[base][0],
                "RSS / torch": med[name][1] / med[base][1],
                "vs": base,
                "walls_s": [round(w, 3) for w, _ in runs[name]],
                "rss_mib": [round(m, 1) for _, m in runs[name]],
            }
        )
    result = {"benchmark": "cold_start", "model_dir": str(model_dir), "rows": rows}
    result["machine"] = benchlib.finish_machine(info)
    print(
        benchlib.table(
            rows, ["contender", "wall s", "peak RSS MiB", "wall / torch", "RSS / torch", "vs"]
        )
    )
    print(f"wrote {benchlib.write_json(args.out, result)}")


if __name__ == "__main__":
    benchlib.run_main(main)

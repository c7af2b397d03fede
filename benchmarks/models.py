"""Model folders the benchmarks share: all-MiniLM-L6-v2 exported by `diffcse-export`.

Exports are cached under benchmarks/.cache/ (git-ignored) and reused while the source and
the exporter's version are unchanged; delete the folder to force a fresh export. The
benchmarks call the documented `diffcse-export` command line, as a user would, so a
broken or missing exporter shows up here as a clear message rather than a stub figure.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.benchlib import CACHE_DIR, ROOT, VARIANTS, BenchSkip, minilm_dir

# diffcse-export CHECKPOINT OUT [--optimize] [--quantize int8] writes the fp32 model
# directory OUT/ and the variants beside it as OUT-optimized/ and OUT-int8/ (issue 4).
VARIANT_FLAGS = {"fp32": [], "optimized": ["--optimize"], "int8": ["--quantize", "int8"]}


def export_cli() -> list[str]:
    """The diffcse-export command of this interpreter's environment, or BenchSkip."""
    exe = Path(sys.executable).parent / "diffcse-export"
    if not exe.is_file():
        found = shutil.which("diffcse-export")
        if not found:
            raise BenchSkip("diffcse-export is not installed (pip install -e '.[export]')")
        exe = Path(found)
    probe = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode != 0:
        tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BenchSkip(f"diffcse-export does not run yet: {tail[0]}")
    return [str(exe)]


def variant_dirs(out: Path, variants: tuple[str, ...] | list[str] = VARIANTS) -> dict[str, Path]:
    """Where diffcse-export puts each variant of the model directory `out`."""
    return {v: out if v == "fp32" else out.with_name(f"{out.name}-{v}") for v in variants}


def export(
    source: str | Path, out: Path, variants=VARIANTS, extra: tuple[str, ...] = ()
) -> dict[str, Path]:
    """Run `diffcse-export SOURCE OUT [variant flags]`; raise BenchSkip when it fails."""
    cmd = export_cli() + [str(source), str(out), "--overwrite", *extra]
    for v in variants:
        cmd += VARIANT_FLAGS[v]
    out.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    dirs = variant_dirs(out, variants)
    if proc.returncode != 0 or not all((d / "diffcse.json").is_file() for d in dirs.values()):
        msg = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BenchSkip(f"diffcse-export failed (exit {proc.returncode}): {' / '.join(msg)}")
    return dirs


def minilm_variant(variant: str, cache: Path = CACHE_DIR) -> Path:
    """The cached export of all-MiniLM-L6-v2 in `variant`; all variants exported on first use."""
    dirs = variant_dirs(cache / "minilm")
    if not all((d / "diffcse.json").is_file() for d in dirs.values()):
        dirs = export(minilm_dir(), cache / "minilm")
    return dirs[variant]


def given_or_exported(given: str | Path | None, variant: str = "fp32") -> Path:
    """The model directory the user passed (--model, --VARIANT-dir), else the cached export
    of all-MiniLM-L6-v2 in `variant`."""
    return Path(given) if given else minilm_variant(variant)

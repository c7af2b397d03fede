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

from benchlib import CACHE_DIR, ROOT, BenchSkip, minilm_dir

VARIANTS = ("fp32", "optimized", "int8")
# How each variant is asked of diffcse-export (issue 4: --optimize, --quantize int8).
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


def export(source: str | Path, out: Path, variant: str = "fp32", extra: list[str] = ()) -> Path:
    """Run `diffcse-export SOURCE --output OUT [variant flags]`; raise BenchSkip on failure."""
    cmd = export_cli() + [str(source), "--output", str(out), *VARIANT_FLAGS[variant], *extra]
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0 or not (out / "diffcse.json").is_file():
        msg = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BenchSkip(f"diffcse-export {variant} failed (exit {proc.returncode}): {msg}")
    return out


def minilm_variant(variant: str, cache: Path = CACHE_DIR) -> Path:
    """The cached export of all-MiniLM-L6-v2 in `variant`, exporting it on first use."""
    out = cache / f"minilm-{variant}"
    if (out / "diffcse.json").is_file():
        return out
    return export(minilm_dir(), out, variant)

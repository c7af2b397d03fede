"""Test support, imported as `tests.support.X` (pytest puts the repository root on
sys.path: `pythonpath = ["."]` in pyproject.toml): tiny models built on the fly, server,
export and docs helpers, and the scripts tests run as subprocesses by path
(`ddp_worker.py`, `kill_after_step.py`) or CI runs (`slim_smoke.py`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parents[1]
STS_DATA_ENV = "DIFFCSE_STS_DATA"
STS_DATA_DEFAULT = ROOT.parent / "shared" / "data" / "sts"


def sts_data_dir(option: str | None = None) -> Path:
    """The real STS data folder: `--sts-data DIR`, else $DIFFCSE_STS_DATA, else
    ../shared/data/sts beside the repository. The one place tests learn where it is."""
    chosen = option or os.environ.get(STS_DATA_ENV)
    return Path(chosen).expanduser().resolve() if chosen else STS_DATA_DEFAULT


def read_metrics(out: Path, kind: str | None = None) -> list[dict]:
    """A run's metrics.jsonl records (of one `kind`: train, eval, d_warmup), strictly: a
    damaged line fails the test instead of being skipped as the report's reader does."""
    lines = (Path(out) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]

"""A training run's output folder: which files are ours, and the logs we append to.

OUTPUT_DIR holds best/, last/, metrics.jsonl, summary.json, scores.json, report.png,
report.json and tensorboard/, all written by diffcse-train. A new run refuses a folder that
already holds a run unless --overwrite, and then replaces only those entries, each only when
it is provably ours: best/ and last/ by their own ownership manifest, the others by the run
record `.diffcse-run.json` a run writes when it starts (an entry of that name the record does
not list is the user's and is refused), tensorboard/ only while it holds nothing but event
files.
Anything else a user keeps there survives. --resume checks
that last/ exists and that the config did not change in a way that changes the math.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffcse_export.checkpoint_files import BEST_SUBDIR, CONFIG_FILE
from diffcse_runtime.atomic import atomic_file, check_output_file
from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.ownership import NotOursError, check_owned
from diffcse_train import checkpoint
from diffcse_train.checkpoint import CHECKPOINT_TOOL, CHECKPOINT_WHAT
from diffcse_train.config import TrainConfig, resume_mismatch

SUMMARY_FILE = "summary.json"
SCORES_FILE = "scores.json"  # release.py's before/after table
REPORT_PNG = "report.png"  # report.py: the run's curves and STS-B dev geometry
REPORT_JSON = "report.json"  # the numbers report.png draws
TENSORBOARD_DIR = "tensorboard"  # report_to: tensorboard, the event files
EVENT_FILE_PREFIX = "events.out.tfevents."  # the names SummaryWriter gives its files
RUN_RECORD = ".diffcse-run.json"  # the entries of OUTPUT_DIR a run wrote (its claim on them)
RUN_RECORD_FORMAT = "diffcse-run"


def jsonable(value: Any) -> Any:
    """A tensor as its number, a non-finite float as null: metrics.jsonl stays valid JSON."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_writable_dir(out: Path) -> None:
    """output_dir must be a folder we can create and write in, checked before any work."""
    if out.exists() and not out.is_dir():
        raise DiffcseError(f"output_dir {out} is a file, not a folder; choose another output_dir")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise DiffcseError(f"output_dir {out}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise DiffcseError(f"output_dir {out}: no permission to write in {existing}")


def _check_event_files(folder: Path) -> None:
    """tensorboard/ is replaced only while it holds nothing but SummaryWriter's event files:
    a file a user put there (a note, a profile, a subfolder) makes --overwrite refuse."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        regular = entry.is_file(follow_symlinks=False)
        if not (regular and entry.name.startswith(EVENT_FILE_PREFIX)):
            raise NotOursError(
                f"{folder}: {entry.name} is not a TensorBoard event file this run wrote; "
                "refusing to replace the folder even with --overwrite: move it and rerun"
            )


class RunDir:
    """OUTPUT_DIR of one run: its paths, the overwrite/resume rules, metrics and summary."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.best = self.out / BEST_SUBDIR
        self.last = self.out / "last"
        self.metrics = self.out / "metrics.jsonl"

    def ours(self) -> tuple[Path, ...]:
        """Every name a run writes, the only ones --overwrite replaces (the config too: a
        user's file of that name is never rewritten unless the run record claims it)."""
        return (
            self.best,
            self.last,
            self.metrics,
            self.out / SUMMARY_FILE,
            self.out / SCORES_FILE,
            self.out / CONFIG_FILE,
            self.out / REPORT_PNG,
            self.out / REPORT_JSON,
            self.out / TENSORBOARD_DIR,
        )

    def check(self, cfg: TrainConfig, resume: bool, overwrite: bool) -> list[Path]:
        """Refuse to clobber an earlier run; return the paths --overwrite will replace."""
        check_writable_dir(self.out)
        if resume:
            if not (self.last / "trainer_state.json").is_file():
                raise DiffcseError(f"--resume: {self.out} has no last/ checkpoint to resume from")
            mismatch = resume_mismatch(checkpoint.read_last_config(self.last), cfg)
            if mismatch:
                raise DiffcseError(f"--resume: the config changed since the checkpoint: {mismatch}")
            return []
        existing = [p for p in self.ours() if os.path.lexists(p)]
        if existing and not overwrite:
            raise DiffcseError(
                f"output_dir {self.out} already holds a training run ({existing[0].name}); "
                "pass --resume to continue it or --overwrite to start over"
            )
        claimed = self._claimed()
        for path in existing:
            self._check_ours(path, claimed)
        return existing

    def _claimed(self) -> set[str]:
        """The names the run record lists (none when it is absent or not ours)."""
        record = self.out / RUN_RECORD
        try:
            if not stat.S_ISREG(os.lstat(record).st_mode):  # a FIFO would block the read
                return set()
            body = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        if not isinstance(body, dict) or body.get("format") != RUN_RECORD_FORMAT:
            return set()
        entries = body.get("entries")
        return {e for e in entries if isinstance(e, str)} if isinstance(entries, list) else set()

    def _check_ours(self, path: Path, claimed: set[str]) -> None:
        """--overwrite removes best/ and last/ only if their manifests account for every
        entry, and a file only if it is regular and the run record lists it."""
        if path in (self.best, self.last):
            check_owned(path, CHECKPOINT_TOOL, CHECKPOINT_WHAT)
            return
        events = path.name == TENSORBOARD_DIR and stat.S_ISDIR(os.lstat(path).st_mode)
        if not events:
            check_output_file(path)
        if path.name not in claimed:
            raise NotOursError(
                f"{path}: no {RUN_RECORD} in {self.out} lists it, so it may be yours; "
                "refusing to replace it even with --overwrite: look at it, and if it is "
                "from an earlier run remove it by hand and rerun"
            )
        if events:
            _check_event_files(path)

    def start(self, cfg: TrainConfig, replaced: list[Path]) -> None:
        """Remove what --overwrite replaces, claim the run's entries, record its config."""
        for path in replaced:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.out / RUN_RECORD, "w") as fh:
            names = [p.name for p in self.ours()]
            fh.write(json.dumps({"format": RUN_RECORD_FORMAT, "entries": names}) + "\n")
        with atomic_file(self.out / CONFIG_FILE, "w") as fh:
            fh.write(cfg.to_yaml())

    def append_metrics(self, record: dict) -> None:
        check_output_file(self.metrics)  # append to a regular file only, never through a link
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: jsonable(v) for k, v in record.items()}) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop log lines of steps after the checkpoint (they will be redone)."""
        if not self.metrics.is_file():
            return
        lines = self.metrics.read_text(encoding="utf-8").splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with atomic_file(self.metrics, "w") as fh:
            fh.write("".join(ln + "\n" for ln in kept))

    def write_summary(self, summary: Any) -> None:
        with atomic_file(self.out / SUMMARY_FILE, "w") as fh:
            fh.write(json.dumps(asdict(summary), indent=2) + "\n")

"""The run's own report: `report.png` + `report.json` after training, TensorBoard while it runs.

ML engineers judge a run by its curves. Every metrics line the trainer writes passes through
`RunReport.on_metrics` (rank 0 only), which

- with `report_to: tensorboard` writes its numbers as scalars under OUTPUT_DIR/tensorboard/
  (train/<key> per step, dev/<key> per evaluation, d_warmup/<key>), and
- at the evaluations that matter (the input model at step 0, and each new best step) measures
  the geometry of STS-B dev: alignment and uniformity (Wang & Isola 2020, the analysis of the
  SimCSE and DiffCSE papers) and the cosine of the pairs in each gold-score bucket.

The geometry reuses the vectors the evaluation just computed (`RecordingEncode`), so it costs
no extra forward pass; per training step it writes one summary event (~0.25 ms). At the
end, `finish` draws the curves from metrics.jsonl (the run's record, which a resume already
trimmed) and the geometry into report.png, and writes the same numbers to report.json. The
geometry is saved to report.json as soon as it is measured, so a resumed run still has the
input model's (its step 0 is not evaluated again).
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diffcse_runtime import sts
from diffcse_runtime.atomic import atomic_file
from diffcse_runtime.errors import DiffcseError
from diffcse_train.config import TrainConfig
from diffcse_train.evaluation import TASK_KEYS
from diffcse_train.run_dir import REPORT_JSON, REPORT_PNG, TENSORBOARD_DIR, RunDir

log = logging.getLogger("diffcse_train")

REPORT_FORMAT = "diffcse-report"
ANALYSIS_TASK = "STSBenchmark"
ALIGN_GOLD = 4.0  # alignment is measured over the dev pairs at least this similar
BUCKETS = ((0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0), (4.0, 5.0))  # the last is closed
NOT_SCALARS = ("kind", "step", "epoch", "best", "eligible", "eval_tasks")
INSTALL = 'pip install "diffcse[train]"'


def check_available(cfg: TrainConfig) -> None:
    """Before anything slow: the packages the report settings need are importable."""
    import importlib.util

    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise DiffcseError(
            f"key 'report_to': tensorboard needs the tensorboard package: {INSTALL}, "
            "or set report_to: none"
        )
    if cfg.report and importlib.util.find_spec("matplotlib") is None:
        raise DiffcseError(
            f"key 'report': drawing report.png needs matplotlib: {INSTALL}, or set report: false"
        )


class RecordingEncode:
    """An encode function that remembers its answers until `forget`, so the report measures
    the dev set on the vectors the evaluation computed instead of encoding it again."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray]) -> None:
        self.encode = encode
        self.latest: dict[tuple[str, ...], np.ndarray] = {}

    def __call__(self, sentences: list[str]) -> np.ndarray:
        out = self.encode(sentences)
        self.latest[tuple(sentences)] = out
        return out

    def recall(self, sentences: list[str]) -> np.ndarray:
        """The remembered vectors of exactly these sentences, else a fresh encode."""
        found = self.latest.get(tuple(sentences))
        return found if found is not None else self.encode(sentences)

    def forget(self) -> None:
        self.latest.clear()


# ---------------------------------------------------------------- geometry of STS-B dev


def uniformity(unit: np.ndarray, chunk: int = 512) -> float | None:
    """log E exp(-2 ||x - y||^2) over all distinct pairs of unit vectors (Wang & Isola, t=2).

    On the unit sphere ||x - y||^2 = 2 - 2 cos, so every term lies in [exp(-8), 1]: the sum
    cannot overflow. Computed in row blocks, never as an n x n matrix.
    """
    n = len(unit)
    if n < 2:
        return None
    unit = unit.astype(np.float64)
    total = 0.0
    for start in range(0, n, chunk):
        block = unit[start : start + chunk] @ unit.T  # cosines of these rows with all rows
        rows = np.arange(start, start + len(block))
        upper = np.arange(n)[None, :] > rows[:, None]  # each pair once, no self-pairs
        total += np.exp(-2.0 * (2.0 - 2.0 * block[upper])).sum()
    return float(math.log(total / (n * (n - 1) / 2)))


def box_stats(values: np.ndarray) -> dict[str, float | int | None]:
    """Matplotlib's box statistics (whiskers at 1.5 IQR) of one bucket, JSON-ready."""
    if len(values) == 0:
        return {"n": 0, "mean": None, "q1": None, "median": None, "q3": None}
    q1, med, q3 = (float(x) for x in np.percentile(values, [25, 50, 75]))
    iqr = q3 - q1
    inside = values[(values >= q1 - 1.5 * iqr) & (values <= q3 + 1.5 * iqr)]
    return {
        "n": len(values),
        "mean": float(values.mean()),
        "q1": q1,
        "median": med,
        "q3": q3,
        "whislo": float(inside.min()),
        "whishi": float(inside.max()),
    }


def analyse(encode: RecordingEncode, eval_dir: Path, step: int) -> dict[str, Any]:
    """Alignment, uniformity and the cosine per gold bucket of STS-B dev, for the model
    `encode` encodes with now (f's pooled vectors, the ones the dev score uses)."""
    pairs = sts.load_task(eval_dir, ANALYSIS_TASK, "dev")
    vocab = list(dict.fromkeys(pairs.sents1 + pairs.sents2))  # the order sts.score_pairs uses
    index = {s: i for i, s in enumerate(vocab)}
    emb = np.asarray(encode.recall(vocab), dtype=np.float64)
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    a = unit[[index[s] for s in pairs.sents1]]
    b = unit[[index[s] for s in pairs.sents2]]
    cos = (a * b).sum(axis=1)
    close = pairs.gold >= ALIGN_GOLD
    align = float(((a[close] - b[close]) ** 2).sum(axis=1).mean()) if close.any() else None
    buckets = []
    for low, high in BUCKETS:
        inside = (pairs.gold >= low) & ((pairs.gold < high) | (high == BUCKETS[-1][1]))
        buckets.append({"range": [low, high], **box_stats(cos[inside])})
    return {
        "step": step,
        "alignment": align,
        "aligned_pairs": int(close.sum()),
        "uniformity": uniformity(unit),
        "sentences": len(vocab),
        "pairs": len(pairs),
        "buckets": buckets,
    }


# ---------------------------------------------------------------- the run's report


def read_json(path: Path) -> dict | None:
    """A JSON object from a regular file, else None (absent, a FIFO, damaged)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records (a damaged line, e.g. cut by a kill, is skipped)."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def scalars_summary(values: dict[str, float]):
    """One step's scalars as ONE summary event: what add_scalar writes per tag (a
    simple_value), at a seventh of the cost of a call per tag (~0.25 ms a step for ten)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()])


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity as null: report.json stays valid JSON, and a
    degenerate number never stops a training run at an evaluation."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class RunReport:
    """The report of one run: TensorBoard scalars as metrics arrive, the geometry at the
    evaluations that matter, report.png/report.json at the end. Inert on ranks > 0."""

    def __init__(
        self,
        cfg: TrainConfig,
        out: Path,
        eval_dir: Path | None,
        encode: RecordingEncode,
        resume: bool,
        main: bool,
    ) -> None:
        self.cfg, self.out, self.eval_dir, self.encode = cfg, Path(out), eval_dir, encode
        self.resume, self.main = resume, main
        self.writer = None
        self.geometry: dict[str, dict] = {}
        if main and resume:  # the input model's geometry, measured before the restart
            saved = read_json(self.out / REPORT_JSON) or {}
            if saved.get("format") == REPORT_FORMAT and isinstance(saved.get("geometry"), dict):
                self.geometry = saved["geometry"]

    # ------------------------------------------------------------ while training

    def on_metrics(self, record: dict) -> None:
        """One metrics line was written: its scalars to TensorBoard; after an evaluation of
        the input model or of a new best step, that model's geometry."""
        if not self.main:
            return
        if self.cfg.report_to == "tensorboard" and isinstance(record.get("step"), int):
            self._scalars(record)
        if record.get("kind") == "eval":
            self._measure(record)

    def _scalars(self, record: dict) -> None:
        """train/<key> per step, dev/<key> per evaluation, d_warmup/<key> per warm-up step.
        D's warm-up steps come before step 1, so they are drawn at steps 1-n..0: a resume's
        purge (steps after its checkpoint) never hides them."""
        kind, step = record["kind"], record["step"]
        if kind == "d_warmup":  # warm-up steps 1..n are drawn at 1-n..0
            step -= getattr(self.cfg, "discriminator_warmup_steps", 0)
        group = "dev" if kind == "eval" else str(kind)
        values = {f"{group}/{k}": v for k, v in record.items() if k not in NOT_SCALARS}
        values = {tag: float(v) for tag, v in values.items() if _number(v)}
        if values:
            self._tensorboard(step).add_summary(scalars_summary(values), step)

    def _measure(self, record: dict) -> None:
        """The geometry of the model just evaluated, when it is the input or a new best."""
        step = int(record["step"])
        roles = (["input"] if step == 0 else []) + (["best"] if record.get("best") else [])
        if roles and self.cfg.report and self.eval_dir is not None:
            measured = analyse(self.encode, self.eval_dir, step)
            self.geometry.update(dict.fromkeys(roles, measured))
            self._write_json({})  # kept for a --resume, which does not evaluate step 0 again
        self.encode.forget()

    def _tensorboard(self, first_step: int):
        """The SummaryWriter's event file, opened at the first scalar. A resumed run starts
        a new file whose purge_step hides the old file's events of the steps now redone."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = first_step if self.resume else None
            self.writer = SummaryWriter(str(self.out / TENSORBOARD_DIR), purge_step=purge)
        return self.writer.file_writer

    def close(self) -> None:
        """Flush and close the event file (at the end, and when the run is interrupted)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> RunReport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ at the end

    def finish(self, selected_step: int | None) -> Path | None:
        """Write report.json and draw report.png from metrics.jsonl and the geometry; the
        png's path (None with `report: false`). A drawing failure costs the picture, not
        the trained model: it is logged and the run still ends well."""
        self.close()
        if not self.main or not self.cfg.report:
            return None
        series = self._series(selected_step)
        self._write_json(series)
        try:
            from diffcse_train.report_plot import draw

            path = draw(self.out / REPORT_PNG, series, self.geometry, self._no_geometry())
        except Exception as exc:  # noqa: BLE001 - the run's model is saved already
            log.warning("report: could not draw %s (%s: %s)", REPORT_PNG, type(exc).__name__, exc)
            return None
        log.info("report: %s", path)
        return path

    def _no_geometry(self) -> str:
        """Why the geometry panels are empty, in words."""
        if self.eval_dir is None:
            where = self.cfg.eval_data_dir or "(eval_data_dir is not set)"
            return f"no STS-B dev data under {where}"
        if self.resume:
            return "not measured: this run was resumed and its earlier report.json was not found"
        return "no geometry was measured (no evaluation ran)"

    def _series(self, selected_step: int | None) -> dict[str, Any]:
        """The curves, as drawn: dev scores per evaluation, losses and D's numbers per step."""
        records = read_metrics(RunDir(self.out).metrics)
        evals = sorted((r for r in records if r.get("kind") == "eval"), key=lambda r: r["step"])
        train = [r for r in records if r.get("kind") == "train"]
        tasks = [k for k in TASK_KEYS.values() if any(_number(r.get(k)) for r in evals)]
        first = evals[0] if evals and evals[0].get("step") == 0 else {}
        return {
            "eval": {
                "steps": [r["step"] for r in evals],
                "scores": {k: [r.get(k) for r in evals] for k in tasks},
                "input": {k: first.get(k) for k in tasks} if first else None,
                "selected_step": selected_step,
            },
            "train": {
                "steps": [r["step"] for r in train],
                **{k: [r.get(k) for r in train] for k in TRAIN_SERIES},
            },
            "discriminator": any(_number(r.get("rtd_acc")) for r in train),
        }

    def _write_json(self, series: dict) -> None:
        body = {"format": REPORT_FORMAT, "version": 1, **series}
        body["geometry"] = self.geometry
        body["geometry_task"] = f"{ANALYSIS_TASK} dev"
        if not self.geometry:
            body["geometry_missing"] = self._no_geometry()
        with atomic_file(self.out / REPORT_JSON, "w") as fh:
            json.dump(finite(body), fh, indent=1, allow_nan=False)
            fh.write("\n")


# the per-step curves; rtd_rep_acc is D's recall of replaced tokens
TRAIN_SERIES = ("loss", "loss_contrast", "loss_rtd", "rtd_acc", "rtd_rep_acc", "lr")

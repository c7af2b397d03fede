"""After training: export best/ through the parity gate and score before vs after.

The main job promises a model that is better than the one it started from. This module
checks that promise the way a user would: both models are exported to ONNX model
directories (each through the export's numeric parity gate) and scored by the runtime
`Encoder` on the same dev sets, each with the pooling it declares. The input model is
scored with its native pooling, so a [CLS] model trained from a mean-pooled source would
show its loss here instead of hiding it.

The table goes to standard output (`diffcse-train` prints it) and to
OUTPUT_DIR/scores.json. The trained model directories are `export_dir` (fp32) and
`export_dir`-int8 beside it; the input model's export is temporary.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from diffcse_runtime import builtin, sts
from diffcse_runtime.atomic import atomic_file, check_replaceable
from diffcse_runtime.encoder import Encoder
from diffcse_runtime.errors import DiffcseError
from diffcse_train.compare import Arm, objective_name, pick
from diffcse_train.config import TrainConfig
from diffcse_train.triplets import resolve_objective

log = logging.getLogger("diffcse_train")
SCORE_TASKS = ("STSBenchmark", "SICKRelatedness")  # dev split: STS-B dev, SICK-R trial
TASK_NAMES = {"STSBenchmark": "STS-B dev", "SICKRelatedness": "SICK-R trial"}
SCORES_FILE = "scores.json"


@dataclass
class Row:
    """One model's scores: Spearman x100 per task (None where the task's data is absent)."""

    name: str
    pooling: str
    path: str
    scores: dict[str, float | None] = field(default_factory=dict)


def export_variants(cfg: TrainConfig) -> list[str]:
    """The extra variants `export_variants` names ("int8,optimized", "" for fp32 only)."""
    names = [v.strip() for v in cfg.export_variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in ("optimized", "int8", "fp16")]
    if unknown:
        raise DiffcseError(
            f"key 'export_variants': unknown variant {unknown[0]!r}; use optimized, int8, fp16"
        )
    return names


def _options(cfg: TrainConfig, variants: list[str], overwrite: bool, sts_data: Path | None):
    from diffcse_export import ExportOptions

    return ExportOptions(
        optimize="optimized" in variants,
        quantize="int8" if "int8" in variants else None,
        fp16="fp16" in variants,
        max_seq_length=None,
        sts_data=sts_data,
        overwrite=overwrite,
    )


def export_trained(cfg: TrainConfig, overwrite: bool, best: Path | None = None) -> dict[str, Path]:
    """Export `best` (OUTPUT_DIR/best) with its own pooling; return {variant: model directory}."""
    from diffcse_export import export_model, format_table, target_dirs

    best = best or Path(cfg.output_dir) / "best"
    variants = export_variants(cfg)
    sts_data = Path(cfg.eval_data_dir) if cfg.eval_data_dir else None
    opts = _options(cfg, variants, overwrite, sts_data)
    log.info("exporting %s to %s (%s)", best, cfg.export_dir, ", ".join(opts.variants()))
    reports = export_model(best, cfg.export_dir, opts)
    log.info("%s", format_table(reports))
    return dict(target_dirs(cfg.export_dir, opts.variants()))


def _score(model_dir: Path, data: Path | None) -> tuple[dict[str, float | None], str]:
    encoder = Encoder(model_dir)
    scores: dict[str, float | None] = dict.fromkeys(SCORE_TASKS)
    if data is not None:
        present = [t for t in sts.available_tasks(data, "dev") if t in SCORE_TASKS]
        if present:
            result = sts.evaluate(encoder.encode, data, present, split="dev")
            scores.update({t: result.scores[t].spearman for t in present})
    return scores, encoder.meta.pooling


def _score_export_of(cfg: TrainConfig, source: Path, data: Path | None, name: str) -> Row:
    """A model not shipped (the input, the arm that lost), exported to a temporary fp32
    directory with its native pooling and scored by the runtime."""
    from diffcse_export import ExportOptions, export_model

    with tempfile.TemporaryDirectory(prefix=".score-onnx-", dir=cfg.output_dir) as tmp:
        export_model(source, Path(tmp) / "model", ExportOptions(sts_data=None))
        scores, pooling = _score(Path(tmp) / "model", data)
    return Row(name, pooling, str(source), scores)


def score_input_model(cfg: TrainConfig, data: Path | None) -> Row:
    """The untouched input model, exported with its native pooling, scored by the runtime."""
    row = _score_export_of(cfg, builtin.model_path(cfg.model_name_or_path), data, "input model")
    row.path = str(cfg.model_name_or_path)
    return row


def before_after(
    cfg: TrainConfig, exported: dict[str, Path], label: str = "trained", others: tuple = ()
) -> list[Row]:
    """Rows for the input model, each exported variant (`label (variant)`), and each arm
    that was not shipped, on STS-B dev and SICK-R trial."""
    data = Path(cfg.eval_data_dir) if cfg.eval_data_dir else None
    if data is None or not set(SCORE_TASKS) & set(sts.available_tasks(data, "dev")):
        log.warning("no STS-B dev / SICK-R trial data found: the before/after table is skipped")
        return []
    rows = [score_input_model(cfg, data)]
    for variant, folder in exported.items():
        scores, pooling = _score(folder, data)
        rows.append(Row(f"{label} ({variant})", pooling, str(folder), scores))
    for arm in others:
        rows.append(_score_export_of(cfg, arm.best_dir, data, f"{arm.name}, not shipped"))
    return rows


def format_rows(rows: list[Row]) -> str:
    """A plain-text table: model, pooling, one column per task, and the change."""
    head = f"{'model':<26} {'pooling':<8} " + " ".join(f"{TASK_NAMES[t]:>15}" for t in SCORE_TASKS)
    lines = [head, "-" * len(head)]
    base = rows[0].scores if rows else {}
    for row in rows:
        cells = []
        for task in SCORE_TASKS:
            value = row.scores.get(task)
            delta = "" if row is rows[0] or value is None else f" ({value - base[task]:+.2f})"
            cells.append("n/a" if value is None else f"{value:.2f}{delta}")
        lines.append(f"{row.name:<26} {row.pooling:<8} " + " ".join(f"{c:>15}" for c in cells))
    lines.append("Spearman x100 of cosine, scored by diffcse_runtime.Encoder on the dev splits")
    if len(rows) > 1:
        lines.append(verdict(rows[0], rows[1]))
    return "\n".join(lines)


def verdict(before: Row, after: Row) -> str:
    """One sentence on the promise: better on every dev set, unchanged, or worse where."""
    pairs = [
        (TASK_NAMES[t], after.scores[t] - before.scores[t])
        for t in SCORE_TASKS
        if after.scores.get(t) is not None and before.scores.get(t) is not None
    ]
    if not pairs:
        return "no dev set was scored, so nothing is claimed"
    if all(abs(d) < 0.005 for _, d in pairs):
        return (
            "the trained model scores as the input model: no evaluated step beat the input at "
            "selection, so the input was shipped unchanged (see metrics.jsonl)"
        )
    worse = [f"{n} ({d:+.2f})" for n, d in pairs if d < 0]
    if worse:
        return "the trained model is BELOW the input model on " + ", ".join(worse)
    return "the trained model beats the input model on every dev set"


def shipped_line(arms: list[Arm], shipped: Arm, cfg: TrainConfig) -> str:
    """Which objective shipped and why: each arm's selection score and step."""
    on = "+".join(TASK_NAMES.get(t, t) for t in cfg.select_tasks)
    parts = [
        f"{a.name} {'n/a' if a.best_score is None else f'{a.best_score:.2f}'} (step {a.best_step})"
        for a in arms
    ]
    return f"shipped: {shipped.name}, the better on {on} at selection: " + " vs ".join(parts)


def release(cfg: TrainConfig, overwrite: bool = False, arms: list[Arm] | None = None) -> list[Row]:
    """Export the trained model (with `arms`, the better arm's), print and save the
    before/after table; return its rows."""
    if not arms:  # called on its own: name the objective train_file resolves to
        objective = resolve_objective(cfg.objective, cfg.train_file, cfg.encoding_errors)
        arms = [Arm(objective_name(cfg, objective), cfg)]
    shipped = pick(arms)
    exported = export_trained(cfg, overwrite, shipped.best_dir)
    others = tuple(a for a in arms if a is not shipped)
    rows = before_after(cfg, exported, shipped.name, others)
    if rows:
        payload = {
            "tasks": list(SCORE_TASKS),
            "split": "dev",
            "shipped": shipped.name,
            "arms": [
                {
                    "objective": a.name,
                    "output_dir": str(a.cfg.output_dir),
                    "selection_score": a.best_score,
                    "best_step": a.best_step,
                }
                for a in arms
            ],  # fmt: skip
            "rows": [r.__dict__ for r in rows],
        }
        with atomic_file(Path(cfg.output_dir) / SCORES_FILE, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
    return rows


def check_before_training(cfg: TrainConfig, overwrite: bool) -> None:
    """Fail before training, not after it: the export extra is missing, a variant name is
    wrong, or an export target exists that this run may not replace."""
    try:
        from diffcse_export import target_dirs
        from diffcse_export.pipeline import EXPORT_TOOL
    except ImportError:
        raise DiffcseError(
            'export_dir is set but diffcse_export is not installed: pip install "diffcse[export]"'
            " or set export_dir: null"
        ) from None
    names = ["fp32", *export_variants(cfg)]
    for target in target_dirs(cfg.export_dir, names).values():
        if target.exists() and not overwrite:
            raise DiffcseError(
                f"export_dir: {target} already exists; pass --overwrite (or --resume) to "
                "replace the model directory this command wrote there"
            )
        if overwrite:  # a folder the export would refuse after training is refused now
            check_replaceable(target, True, EXPORT_TOOL, "a model directory")

"""report.png: the run's curves and STS-B dev geometry on one page (matplotlib, no screen).

Drawn from what report.py collected (the same numbers it writes to report.json), through a
bare `Figure` and the Agg canvas: no pyplot, no display, no global backend switched.
Panels: dev scores per evaluation (input model dashed, selected step marked); the
contrastive and RTD losses; D's accuracy and replaced-token recall; alignment vs
uniformity of the input and the selected model; the cosine of the dev pairs per gold bucket.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffcse_runtime.atomic import atomic_file

TASK_NAMES = {"stsb_dev": "STS-B dev", "sick_trial": "SICK-R trial"}
MODEL_STYLE = {"input": ("input model", "C7"), "best": ("selected", "C3")}


def _label(role: str, g: dict) -> str:
    """'input model (step 0)', 'selected (step 40)', or 'selected: the input model (step 0)'."""
    name = MODEL_STYLE.get(role, (role, ""))[0]
    if role == "best" and g["step"] == 0:
        name = "selected: the input model"
    return f"{name} (step {g['step']})"


def draw(path: Path, series: dict, geometry: dict[str, dict], missing: str) -> Path:
    """Draw the five panels into `path` (written atomically); return it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 10), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    _dev_scores(fig.add_subplot(grid[0, 0]), series["eval"])
    _losses(fig.add_subplot(grid[0, 1]), series["train"])
    _discriminator(fig.add_subplot(grid[0, 2]), series["train"], series["discriminator"])
    _alignment_uniformity(fig.add_subplot(grid[1, 0]), geometry, missing)
    _buckets(fig.add_subplot(grid[1, 1:]), geometry, missing)
    fig.suptitle(f"diffcse-train report: {path.parent}")
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    return path


def _say(ax, text: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _points(steps: list[int], values: list) -> tuple[list, list]:
    kept = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
    return [s for s, _ in kept], [v for _, v in kept]


def _smooth(values: list[float]) -> np.ndarray:
    """A running mean over ~2% of the run, so a long run's trend shows through the noise."""
    window = max(1, len(values) // 50)
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid") if window > 1 else np.asarray(values)


def _curve(ax, steps: list[int], values: list, label: str, color: str) -> bool:
    """Raw per-step values, faint, with their running mean; False when there are none."""
    xs, ys = _points(steps, values)
    if not ys:
        return False
    smooth = _smooth(ys)
    ax.plot(xs, ys, color=color, alpha=0.3 if len(smooth) < len(ys) else 1.0, lw=0.8)
    ax.plot(xs[len(xs) - len(smooth) :], smooth, color=color, lw=1.6, label=label)
    return True


def _dev_scores(ax, ev: dict) -> None:
    """Each task's score minus the input model's (tasks ~7 points apart share one readable
    scale, and the input model is the line at 0); absolute scores when step 0 is missing."""
    if not ev["steps"]:
        ax.set_title("dev Spearman x100 per evaluation")
        _say(ax, "no dev evaluation ran (no STS-B dev data under eval_data_dir)")
        return
    selected, base = ev["selected_step"], ev["input"] or {}
    relative = bool(base) and all(base.get(k) is not None for k in ev["scores"])
    ax.set_title(f"dev Spearman x100 per evaluation{' (vs the input)' * relative}")
    for i, (key, values) in enumerate(ev["scores"].items()):
        name, color = TASK_NAMES.get(key, key), f"C{i}"
        xs, ys = _points(ev["steps"], values)
        label = f"{name}: input {base[key]:.2f}, last {ys[-1]:.2f}" if relative else name
        ys = [y - base[key] for y in ys] if relative else ys
        ax.plot(xs, ys, marker="o", ms=4, color=color, label=label)
        if selected in xs:
            ax.plot(selected, ys[xs.index(selected)], marker="*", ms=16, color=color, mec="k")
    if relative:
        ax.axhline(0, color="k", ls="--", lw=1, label="input model")
    if selected is not None:
        ax.axvline(selected, color="k", ls=":", lw=1, label=f"selected step {selected}")
    ax.set_xlabel("step")
    ax.set_ylabel("Spearman x100 minus the input model's" if relative else "Spearman x100")
    ax.legend(fontsize=8)


def _losses(ax, tr: dict) -> None:
    ax.set_title("training losses per step")
    if not tr["steps"]:
        _say(ax, "no training step was logged")
        return
    contrast = tr["loss_contrast"] if any(v is not None for v in tr["loss_contrast"]) else None
    _curve(ax, tr["steps"], contrast or tr["loss"], "contrastive loss", "C0")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss (InfoNCE)", color="C0")
    handles, labels = ax.get_legend_handles_labels()
    rtd = ax.twinx()
    if _curve(rtd, tr["steps"], tr["loss_rtd"], "RTD loss", "C1"):
        rtd.set_ylabel("RTD loss (D's cross-entropy)", color="C1")
        more = rtd.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    else:
        rtd.set_yticks([])
        ax.text(0.98, 0.95, "no RTD loss (no discriminator)", ha="right", transform=ax.transAxes)
    ax.legend(handles, labels, fontsize=8, loc="upper right")


def _discriminator(ax, tr: dict, has_d: bool) -> None:
    ax.set_title("discriminator D per step")
    if not has_d:
        _say(ax, "no discriminator\n(lambda_weight 0 or augmentation none: SimCSE)")
        return
    _curve(ax, tr["steps"], tr["rtd_acc"], "accuracy (real tokens)", "C2")
    _curve(ax, tr["steps"], tr["rtd_rep_acc"], "replaced-token recall", "C4")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)


def _box(bucket: dict) -> dict:
    """A bucket of report.json as the statistics `Axes.bxp` draws (no outliers listed)."""
    keys = {"med": "median", "q1": "q1", "q3": "q3", "mean": "mean"}
    return {**{k: bucket[v] for k, v in keys.items()}, "whislo": bucket["whislo"],
            "whishi": bucket["whishi"], "fliers": []}  # fmt: skip


def _alignment_uniformity(ax, geometry: dict[str, dict], missing: str) -> None:
    ax.set_title("alignment vs uniformity, STS-B dev (lower is better)")
    shown = {k: g for k, g in geometry.items() if None not in (g["alignment"], g["uniformity"])}
    if not shown:
        why = missing if not geometry else "no STS-B dev pair has gold >= 4"
        _say(ax, f"alignment/uniformity not measured: {why}")
        return
    for role, g in shown.items():
        color = MODEL_STYLE.get(role, (role, "C0"))[1]
        u, a = g["uniformity"], g["alignment"]
        ax.scatter([u], [a], s=80, color=color, zorder=3, label=_label(role, g))
        ax.annotate(f"align {a:.4g}\nuniform {u:.4g}", (u, a), textcoords="offset points",
                    xytext=(8, 6), fontsize=8)  # fmt: skip
    if "input" in shown and "best" in shown:
        start, end = shown["input"], shown["best"]
        ax.annotate("", (end["uniformity"], end["alignment"]),
                    (start["uniformity"], start["alignment"]),
                    arrowprops={"arrowstyle": "->", "color": "0.4"})  # fmt: skip
    ax.set_xlabel("uniformity: log E exp(-2||f(x)-f(y)||²), all dev sentences")
    ax.set_ylabel("alignment: E||f(x)-f(x+)||², pairs with gold >= 4")
    ax.ticklabel_format(useOffset=False)
    ax.margins(0.3)
    ax.legend(fontsize=8)


def _buckets(ax, geometry: dict[str, dict], missing: str) -> None:
    ax.set_title("cosine of STS-B dev pairs by gold score, before and after")
    if not geometry:
        _say(ax, f"cosine distribution not measured: {missing}")
        return
    roles = [r for r in ("input", "best") if r in geometry]
    width = 0.8 / len(roles)
    ticks = []
    for j, role in enumerate(roles):
        color = MODEL_STYLE[role][1]
        stats, positions = [], []
        for i, b in enumerate(geometry[role]["buckets"]):
            if b["n"]:
                stats.append(_box(b))
                positions.append(i + (j - (len(roles) - 1) / 2) * width)
        if stats:
            boxes = ax.bxp(stats, positions=positions, widths=width * 0.9, showmeans=True,
                           patch_artist=True, manage_ticks=False)  # fmt: skip
            for patch in boxes["boxes"]:
                patch.set_facecolor(color)
                patch.set_alpha(0.6)
            boxes["boxes"][0].set_label(_label(role, geometry[role]))
    for b in geometry[roles[0]]["buckets"]:
        low, high = b["range"]
        close = "]" if high == 5 else ")"
        ticks.append(f"[{low:g}, {high:g}{close}\nn={b['n']}")
    ax.set_xticks(range(len(ticks)), ticks)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("gold similarity bucket")
    ax.set_ylabel("cosine (f's pooled vectors)")
    ax.legend(fontsize=8)

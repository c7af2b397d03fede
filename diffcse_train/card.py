"""README.md model card for a run's best/ checkpoint.

best/ is what a user keeps, copies or pushes to a hub before (or instead of) exporting it,
so it says what it is on its own: what it was trained from and on (as the config names
them, never an absolute path of the training machine), the objective under the name the
main job's table gives it (config.objective_name), the vector it gives, the step kept
and its dev score, how to load or export it, and the full config. The front matter is the
hub's model-card metadata: best/ is also a sentence-transformers folder (st_files.py).
diffcse-export writes the card of the exported ONNX directory (diffcse_export/model_card.py).
"""

from __future__ import annotations

import json

from diffcse_runtime import builtin
from diffcse_train.config import TrainConfig, objective_name

CARD_FILE = "README.md"


def _front_matter(cfg: TrainConfig, pooling: str) -> list[str]:
    tags = ["diffcse", "sentence-transformers", "sentence-similarity", "feature-extraction"]
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity"]
    lines += ["tags:", *[f"- {tag}" for tag in [*tags, f"{pooling}-pooling"]]]
    base = builtin.hub_id(cfg.model_name_or_path)
    if base:
        lines.append(f"base_model: {json.dumps(base)}")  # a JSON string is a YAML scalar
    return [*lines, "---"]


def _score(metrics: dict) -> str:
    dev, before = metrics.get("stsb_dev"), metrics.get("initial_stsb_dev")
    if not isinstance(dev, int | float):
        return "not scored (no eval_data_dir): this is the last step"
    start = f", {before:.2f} before training" if isinstance(before, int | float) else ""
    return f"STS-B dev Spearman x100 {dev:.2f}{start} (scored by the trainer in PyTorch)"


def best_card(cfg: TrainConfig, head: dict, metrics: dict) -> str:
    """The README.md text of best/ for a run of `cfg` (head: diffcse_head.json's dict)."""
    pooling = head["pooling"]
    vector = "masked mean of the token states" if pooling == "mean" else "[CLS] state"
    if head.get("normalize"):
        vector += ", L2-normalised"
    # the main job's table names the arm the same way: one wording for one run
    objective = objective_name(cfg, metrics.get("objective", "unsupervised"))
    rows = [
        ("trained from", f"`{cfg.model_name_or_path}`"),
        ("training text", f"`{cfg.train_file}`"),
        ("objective", objective),
        ("sentence vector", f"{head['hidden_size']} dimensions, {pooling} ({vector})"),
        ("projector", f"{head['projector']} (training only; kept in projector.safetensors)"),
        ("step kept", str(metrics.get("step", "?"))),
        ("dev score", _score(metrics)),
    ]
    body = [
        "# DiffCSE sentence encoder",
        "",
        "A sentence encoder trained with `diffcse-train`. This folder is a Hugging Face "
        "encoder folder and a sentence-transformers folder with the trained pooling, plus "
        "the projector and `diffcse_head.json`.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## Usage",
        "",
        "Export to a validated ONNX model directory for the torch-free runtime:",
        "",
        "```bash",
        "diffcse-export THIS_FOLDER my-model   # then: diffcse-serve --model my-model",
        "```",
        "",
        "Or load it in PyTorch:",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("THIS_FOLDER")',
        'emb = model.encode(["A man plays a guitar.", "Someone makes music."])',
        "```",
        "",
        "## Training config",
        "",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
    ]
    return "\n".join([*_front_matter(cfg, pooling), "", *body]) + "\n"

"""README.md model card for each exported model directory.

A model directory travels alone (copied to a server, pushed to a hub), so it has to say
what it is without the export log: where it came from (and the training config, when it
came from diffcse-train), its pooling and variant, the parity table with the limits it
passed, and how to use it. The YAML front matter is the Hugging Face hub's model-card
metadata (library_name, pipeline_tag, tags, base_model), so a pushed folder is filed and
searched correctly there.

The card is written after the last `diffcse.json` write, so it is not among the hashed
files: editing the card never invalidates the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

from diffcse_export.checkpoint_files import CONFIG_FILE, METRICS_FILE
from diffcse_export.validate import VariantReport, format_table
from diffcse_runtime import builtin
from diffcse_runtime.atomic import atomic_file
from diffcse_runtime.model_dir import ModelMeta, load_metadata

CARD_FILE = "README.md"
_THRESHOLD_TEXT = {
    "atol": "max abs diff <= {}",
    "min_cosine": "min cosine >= {}",
    "max_sts_delta": "|STS-B dev delta| <= {} points",
}


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, quoting included


def front_matter(meta: ModelMeta, base_model: str | None) -> str:
    """The hub's metadata block: how the hub files and lists the model."""
    tags = ["diffcse", "sentence-embeddings", "feature-extraction", "onnx", meta.variant]
    tags.append(f"{meta.pooling}-pooling")
    lines = ["---", "library_name: onnx", "pipeline_tag: sentence-similarity", "tags:"]
    lines += [f"- {_yaml_str(tag)}" for tag in tags]
    if base_model:
        lines.append(f"base_model: {_yaml_str(base_model)}")
    return "\n".join([*lines, "---"])


def _base_model(train_config: str | None, source: str) -> str | None:
    """The hub id training started from (else the exported source's), never a local path."""
    match = re.search(r"^model_name_or_path:\s*['\"]?([^'\"\s]+)", train_config or "", re.M)
    return builtin.hub_id(match.group(1) if match else source)


def _thresholds(report: VariantReport) -> str:
    values = {f.name: getattr(report.thresholds, f.name) for f in fields(report.thresholds)}
    parts = [_THRESHOLD_TEXT[k].format(v) for k, v in values.items() if v is not None]
    return f"- `{report.variant}`: " + (", ".join(parts) or "not gated")


def _model_section(name: str, meta: ModelMeta) -> list[str]:
    vector = "masked mean of the token states" if meta.pooling == "mean" else "[CLS] state"
    if meta.projector_folded:
        vector += ", through the training-time projector (folded)"
    if meta.normalized:
        vector += ", L2-normalised inside the graph"
    rows = [
        ("variant", meta.variant),
        ("embedding dimension", str(meta.embedding_dim)),
        ("pooling", f"{meta.pooling} ({vector})"),
        ("max sequence length", f"{meta.max_seq_length} tokens (longer texts are truncated)"),
        ("inputs", ", ".join(meta.input_names)),
        ("ONNX opset", str(meta.opset)),
        ("source", f"`{meta.source}`"),
        ("model.onnx SHA-256", f"`{meta.onnx_sha256}`"),
    ]
    calibration = meta.validation.get("calibration")
    if meta.variant == "int8" and isinstance(calibration, dict):
        rows.insert(
            1,
            (
                "quantization",
                "static int8 MatMuls: activation scales fixed at export from "
                f"{calibration.get('sentences')} sentences of `{calibration.get('source')}`, "
                "so a text's vector does not depend on its batch",
            ),
        )
    return [
        f"# {name}",
        "",
        f"A sentence encoder exported by diffcse (`diffcse-export`): "
        f"`model.onnx` maps text to one {meta.embedding_dim}-dimensional vector ({vector}). "
        "It runs on onnxruntime with the torch-free `diffcse_runtime`; `diffcse.json` holds the "
        "metadata the runtime checks, `tokenizer.json` the tokenizer.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]


def _training_section(folder: Path, source: str) -> list[str]:
    """`folder` is the checkpoint read; `source` names it as the user did."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        return ["", "## Source", "", f"Exported from `{source}` (not a diffcse-train output)."]
    lines = ["", "## Training", "", f"Trained with `diffcse-train`; checkpoint `{source}`."]
    metrics_path = folder / METRICS_FILE
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            metrics = {}
        if isinstance(metrics, dict) and metrics.get("stsb_dev") is not None:
            before = metrics.get("initial_stsb_dev")
            start = f" (before training: {before:.2f})" if isinstance(before, float) else ""
            lines += [
                "",
                f"Kept step {metrics.get('step')}: STS-B dev Spearman x100 "
                f"{metrics['stsb_dev']:.2f}{start}, scored by the trainer in PyTorch.",
            ]
    config = config_path.read_text(encoding="utf-8").rstrip()
    return [*lines, "", "Training config:", "", "```yaml", config, "```"]


def _validation_section(meta: ModelMeta, reports: list[VariantReport]) -> list[str]:
    return [
        "",
        "## Validation",
        "",
        f"Export compared every variant with the PyTorch float32 reference before writing it "
        f"(this directory is `{meta.variant}`):",
        "",
        "```",
        format_table(reports),
        "```",
        "",
        "Limits each variant had to meet:",
        "",
        *[_thresholds(r) for r in reports],
    ]


def _usage_section(name: str) -> list[str]:
    return [
        "",
        "## Usage",
        "",
        "```bash",
        'pip install diffcse   # "diffcse[serve]" for diffcse-serve',
        "```",
        "",
        "```python",
        "from diffcse_runtime import Encoder",
        "",
        f'encoder = Encoder("{name}")',
        'emb = encoder.encode(["A man plays a guitar.", "Someone makes music."], normalize=True)',
        "print(emb.shape, encoder.similarity(emb[0], emb[1]))",
        "```",
        "",
        "```bash",
        f"diffcse-embed texts.txt --model {name} -o embeddings.npy   # row i = line i",
        f"diffcse-serve --model {name} --port 8080   # OpenAI-compatible /v1/embeddings",
        "curl -s http://127.0.0.1:8080/v1/embeddings -H 'Content-Type: application/json' \\",
        f'  -d \'{{"model": "{name}", "input": ["A man plays a guitar."]}}\'',
        "```",
        "",
        "`tokenizer_config.json` and `special_tokens_map.json` let Hugging Face `AutoTokenizer`"
        " and fastembed's custom-model path read the tokenizer; both truncate at "
        "`model_max_length`, the graph's max sequence length.",
    ]


def model_card(name: str, meta: ModelMeta, reports: list[VariantReport], folder: Path) -> str:
    """The full README.md text of one model directory exported from checkpoint `folder`."""
    config_path = folder / CONFIG_FILE
    config = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    body = [
        *_model_section(name, meta),
        *_training_section(folder, meta.source),
        *_validation_section(meta, reports),
        *_usage_section(name),
    ]
    return front_matter(meta, _base_model(config, meta.source)) + "\n\n" + "\n".join(body) + "\n"


def write_model_cards(
    staged: dict[str, Path],
    targets: dict[str, Path],
    reports: list[VariantReport],
    checkpoint: Path,
) -> None:
    """README.md into every staged model directory (named after its final folder)."""
    for variant, folder in staged.items():
        meta = load_metadata(folder, verify_hash=False)
        text = model_card(targets[variant].name, meta, reports, checkpoint)
        with atomic_file(folder / CARD_FILE, "w") as fh:
            fh.write(text)

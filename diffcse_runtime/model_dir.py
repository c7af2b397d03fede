"""The model directory: the one contract between export and the runtime.

A model directory is a plain folder:

    model.onnx      inputs input_ids, attention_mask (int64, [batch, seq]) and, only where
                    the architecture needs it, token_type_ids; one output
                    `sentence_embedding` [batch, dim] (the pooled vector: [CLS] or masked mean,
                    recorded as `pooling`; or the folded projector)
    tokenizer.json  a Hugging Face `tokenizers` file
    diffcse.json    the metadata below

Export writes it with `write_metadata`; the runtime reads it with `load_metadata`, which
refuses a folder that is missing a file, comes from a newer format, or whose model.onnx
does not match the recorded SHA-256. README.md ("The model directory") documents the same
fields for users.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffcse_runtime.atomic import atomic_file
from diffcse_runtime.errors import ModelDirError
from diffcse_runtime.pooling import POOLINGS

FORMAT_VERSION = 1
METADATA_FILE = "diffcse.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT_NAME = "sentence_embedding"


@dataclass
class ModelMeta:
    """What the runtime needs to know about an exported encoder, and what export measured."""

    embedding_dim: int
    max_seq_length: int
    pad_token_id: int
    input_names: list[str]
    opset: int
    projector_folded: bool = False
    pooling: str = "cls"  # "cls" or "mean" (masked mean over real tokens), inside the graph
    normalized: bool = False  # the graph L2-normalises its output (a Normalize module)
    variant: str = "fp32"
    source: str = ""
    onnx_sha256: str = ""
    validation: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks so a large model never sits in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_metadata(model_dir: str | Path, meta: ModelMeta) -> ModelMeta:
    """Hash model.onnx, record the hash in `meta` and write diffcse.json atomically."""
    model_dir = Path(model_dir)
    for name in (MODEL_FILE, TOKENIZER_FILE):
        if not (model_dir / name).is_file():
            raise ModelDirError(f"{model_dir}: cannot write metadata, {name} is missing")
    meta.onnx_sha256 = sha256_file(model_dir / MODEL_FILE)
    with atomic_file(model_dir / METADATA_FILE, "w") as fh:
        json.dump(meta.to_json(), fh, indent=2, sort_keys=True)
        fh.write("\n")
    return meta


def load_metadata(model_dir: str | Path, verify_hash: bool = True) -> ModelMeta:
    """Read and check a model directory; raise ModelDirError with one clear sentence if bad."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: not a model directory (no such folder)")
    missing = [
        n for n in (MODEL_FILE, TOKENIZER_FILE, METADATA_FILE) if not (model_dir / n).is_file()
    ]
    if missing:
        raise ModelDirError(
            f"{model_dir}: not a complete model directory, missing {', '.join(missing)} "
            "(export one with diffcse-export)"
        )
    meta_path = model_dir / METADATA_FILE
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelDirError(f"{meta_path}: expected a JSON object")
    meta = _meta_from_json(raw, meta_path)
    if verify_hash:
        actual = sha256_file(model_dir / MODEL_FILE)
        if actual != meta.onnx_sha256:
            raise ModelDirError(
                f"{model_dir / MODEL_FILE}: SHA-256 {actual[:12]}... does not match "
                f"{meta.onnx_sha256[:12]}... recorded in {METADATA_FILE}; the file was changed "
                "or truncated after export"
            )
    return meta


def _meta_from_json(raw: dict[str, Any], meta_path: Path) -> ModelMeta:
    version = raw.get("format_version")
    if not isinstance(version, int):
        raise ModelDirError(f"{meta_path}: key 'format_version' is missing or not an integer")
    if version > FORMAT_VERSION:
        raise ModelDirError(
            f"{meta_path}: format version {version} is newer than this runtime reads "
            f"({FORMAT_VERSION}); upgrade diffcse"
        )
    known = {f.name for f in dataclasses.fields(ModelMeta)}
    required = {
        f.name
        for f in dataclasses.fields(ModelMeta)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    absent = sorted(required - raw.keys())
    if absent:
        raise ModelDirError(f"{meta_path}: missing key(s) {', '.join(absent)}")
    meta = ModelMeta(**{k: v for k, v in raw.items() if k in known})
    if meta.pooling not in POOLINGS:
        raise ModelDirError(f"{meta_path}: pooling {meta.pooling!r} is not one of {POOLINGS}")
    if "input_ids" not in meta.input_names or "attention_mask" not in meta.input_names:
        raise ModelDirError(f"{meta_path}: input_names must include input_ids and attention_mask")
    return meta

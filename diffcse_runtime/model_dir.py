"""The model directory: the one contract between export and the runtime.

A model directory is a plain folder:

    model.onnx      inputs input_ids, attention_mask (int64, [batch, seq]) and, only where
                    the architecture needs it, token_type_ids; one output
                    `sentence_embedding` [batch, dim] (the pooled vector: [CLS] or masked mean,
                    recorded as `pooling`; or the folded projector)
    tokenizer.json  a Hugging Face `tokenizers` file
    diffcse.json    the metadata below

Export writes it with `write_metadata`; the runtime reads it with `load_metadata`, which
refuses a folder that is missing a file, comes from a newer format, has a field of the
wrong type or range, whose files do not match the SHA-256s recorded in `files` (every
file of the folder at export; folders from before `files` record model.onnx only), whose
own content does not match its `metadata_sha256`, or whose `embedding_dim` and
`max_seq_length` disagree with what model.onnx declares (its output width, its position
table): a wrong value there would otherwise fail at start-up or on every long input.
README.md ("The model directory") documents the same fields for users.
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
from diffcse_runtime.onnx_facts import read_graph_facts
from diffcse_runtime.pooling import POOLINGS

FORMAT_VERSION = 2  # 2: `prompts` (a runtime reading 1 would ignore them silently)
PROMPTS_VERSION = 2  # the version a folder with prompts needs; others still write 1
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
    files: dict[str, str] = field(default_factory=dict)  # every file it depends on: SHA-256
    validation: dict[str, Any] = field(default_factory=dict)
    # sentence-transformers' prompts: name -> text put before each input (e.g. "query: ")
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None  # the prompt used when encode names none
    metadata_sha256: str = ""  # SHA-256 of this file's other keys (canonical JSON)
    format_version: int = 1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks so a large model never sits in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _depended_files(model_dir: Path) -> list[str]:
    """Every visible regular file of the folder but the metadata itself."""
    return sorted(
        p.name
        for p in model_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name != METADATA_FILE
    )


def write_metadata(model_dir: str | Path, meta: ModelMeta) -> ModelMeta:
    """Hash every file of the folder, record the hashes in `meta`, write diffcse.json atomically."""
    model_dir = Path(model_dir)
    for name in (MODEL_FILE, TOKENIZER_FILE):
        if not (model_dir / name).is_file():
            raise ModelDirError(f"{model_dir}: cannot write metadata, {name} is missing")
    meta.files = {name: sha256_file(model_dir / name) for name in _depended_files(model_dir)}
    meta.onnx_sha256 = meta.files[MODEL_FILE]
    meta.format_version = PROMPTS_VERSION if meta.prompts else 1
    body = meta.to_json()
    meta.metadata_sha256 = body["metadata_sha256"] = metadata_digest(body)
    with atomic_file(model_dir / METADATA_FILE, "w") as fh:
        json.dump(body, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return meta


def metadata_digest(raw: dict[str, Any]) -> str:
    """SHA-256 of diffcse.json's keys but `metadata_sha256`, as canonical JSON.

    A file cannot hold its own hash, so it holds the hash of everything else: a hand edit
    (a wrong `embedding_dim`, a `max_seq_length` beyond the graph) is caught like an edited
    tokenizer.json. Re-record after a deliberate edit with `write_metadata(folder,
    load_metadata(folder, verify_hash=False))`.
    """
    rest = {k: v for k, v in raw.items() if k != "metadata_sha256"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def verify_metadata(meta_path: Path, raw: dict[str, Any]) -> None:
    """The file's content matches its recorded digest (folders from before it have none)."""
    recorded = raw.get("metadata_sha256")
    if recorded and recorded != metadata_digest(raw):
        raise ModelDirError(
            f"{meta_path}: edited after export (its content does not match its "
            "'metadata_sha256'); export the model again, or re-record the hashes with "
            "diffcse_runtime.write_metadata(folder, load_metadata(folder, verify_hash=False))"
        )


def verify_files(model_dir: Path, meta: ModelMeta) -> None:
    """Every recorded file must be there with its SHA-256 (old folders: model.onnx only)."""
    recorded = meta.files or {MODEL_FILE: meta.onnx_sha256}
    for name, expected in recorded.items():
        path = model_dir / name
        if not path.is_file():
            raise ModelDirError(f"{path}: missing, but {METADATA_FILE} records it")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelDirError(
                f"{path}: SHA-256 {actual[:12]}... does not match {expected[:12]}... recorded "
                f"in {METADATA_FILE}; the file was changed or truncated after export "
                "(export the model again)"
            )


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
        verify_metadata(meta_path, raw)
        verify_files(model_dir, meta)
    check_against_graph(model_dir, meta)
    return meta


def check_against_graph(model_dir: Path, meta: ModelMeta) -> None:
    """`embedding_dim` and `max_seq_length` must fit what model.onnx itself declares.

    Checked on every load, hashes verified or not. The position table of a RoBERTa-style
    model (pad_token_id > 0: RoBERTa, XLM-R, MPNet, CamemBERT) starts after the padding
    row, so it embeds `rows - pad_token_id - 1` tokens, as export computes it.
    """
    facts = read_graph_facts(model_dir / MODEL_FILE)
    if facts is None:
        return  # not parseable here: onnxruntime says why when the Encoder loads it
    meta_path = model_dir / METADATA_FILE
    if facts.output_width is not None and facts.output_width != meta.embedding_dim:
        raise ModelDirError(
            f"{meta_path}: key 'embedding_dim' is {meta.embedding_dim}, but {MODEL_FILE} "
            f"outputs {facts.output_width}-wide vectors (export the model again)"
        )
    if facts.position_rows is not None:
        offset = meta.pad_token_id + 1 if meta.pad_token_id > 0 else 0
        positions = facts.position_rows - offset
        if meta.max_seq_length > positions:
            raise ModelDirError(
                f"{meta_path}: key 'max_seq_length' is {meta.max_seq_length}, but "
                f"{MODEL_FILE}'s position table embeds at most {positions} tokens "
                f"(set it to {positions} or less, or export the model again)"
            )


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
    values = {k: v for k, v in raw.items() if k in known}
    for key, value in values.items():
        problem = field_problem(key, value)
        if problem:
            raise ModelDirError(f"{meta_path}: key '{key}' {problem} (got {value!r:.60})")
    if "onnx_sha256" not in values and "files" not in values:
        raise ModelDirError(f"{meta_path}: records no hash of {MODEL_FILE} (key 'files')")
    default = values.get("default_prompt_name")
    if default is not None and default not in values.get("prompts", {}):
        raise ModelDirError(
            f"{meta_path}: key 'default_prompt_name' is {default!r}, which is not a key of "
            "'prompts'"
        )
    return ModelMeta(**values)


INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_SEQ_LENGTH = 16384  # beyond any released encoder's position table
MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 4096  # a prompt is an instruction, not a document


def _prompts_ok(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= MAX_PROMPTS
        and all(isinstance(k, str) and 0 < len(k) <= 100 for k in value)
        and all(isinstance(v, str) and len(v) <= MAX_PROMPT_CHARS for v in value.values())
    )


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_sha(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in HEX for c in value)


HEX = set("0123456789abcdef")


def field_problem(key: str, value: Any) -> str | None:
    """Why `value` is not valid for `key`, or None: every field is checked before use."""
    checks = {
        "embedding_dim": (lambda v: _int_in(v, 1, 1 << 16), "must be an integer from 1 to 65536"),
        "max_seq_length": (
            lambda v: _int_in(v, 1, MAX_SEQ_LENGTH),
            f"must be an integer from 1 to {MAX_SEQ_LENGTH}",
        ),
        "pad_token_id": (lambda v: _int_in(v, 0, 1 << 31), "must be a non-negative integer"),
        "opset": (lambda v: _int_in(v, 1, 100), "must be an integer from 1 to 100"),
        "format_version": (lambda v: _int_in(v, 1, FORMAT_VERSION), "must be a positive integer"),
        "input_names": (
            lambda v: (
                isinstance(v, list)
                and all(isinstance(n, str) and n in INPUTS for n in v)
                and len(set(v)) == len(v)
                and {"input_ids", "attention_mask"} <= set(v)
            ),
            f"must be a list of distinct names from {INPUTS} with input_ids and attention_mask",
        ),
        "projector_folded": (lambda v: isinstance(v, bool), "must be true or false"),
        "normalized": (lambda v: isinstance(v, bool), "must be true or false"),
        "pooling": (lambda v: v in POOLINGS, f"must be one of {', '.join(POOLINGS)}"),
        "variant": (lambda v: isinstance(v, str), "must be a string"),
        "source": (lambda v: isinstance(v, str), "must be a string"),
        "onnx_sha256": (_is_sha, "must be a 64-digit lower-case hex SHA-256"),
        "files": (
            lambda v: (
                isinstance(v, dict)
                and MODEL_FILE in v
                and all(
                    isinstance(k, str)
                    and k
                    and "/" not in k
                    and "\\" not in k
                    and k not in ("..", ".")
                    for k in v
                )
                and all(_is_sha(h) for h in v.values())
            ),
            f"must map file names (including {MODEL_FILE}) to 64-digit hex SHA-256s",
        ),
        "validation": (lambda v: isinstance(v, dict), "must be a JSON object"),
        "prompts": (
            _prompts_ok,
            f"must map up to {MAX_PROMPTS} names (1-100 characters) to prompt strings of at "
            f"most {MAX_PROMPT_CHARS} characters",
        ),
        "default_prompt_name": (
            lambda v: v is None or isinstance(v, str),
            "must be a prompt name or null",
        ),
        "metadata_sha256": (_is_sha, "must be a 64-digit lower-case hex SHA-256"),
    }
    ok, problem = checks[key]
    return None if ok(value) else problem

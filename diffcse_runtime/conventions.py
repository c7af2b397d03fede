"""The embedding conventions users bring from sentence-transformers and OpenAI clients.

Matryoshka-style truncation (`truncate_dim`, OpenAI's `dimensions`) and scalar/binary
quantization (`precision`) live here, numpy-only, so `Encoder.encode`, the server and any
other caller apply them the one same way. `quantize_embeddings` reproduces
`sentence_transformers.quantization.quantize_embeddings` bit for bit (a test compares them),
so vectors quantized here can be searched against ones quantized there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.model_dir import field_problem

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


class ConventionError(DiffcseError, ValueError):
    """An encode option (truncate_dim, precision, prompt...) that cannot apply to this model.

    Also a ValueError, as sentence-transformers raises for the same mistakes, so code written
    against either library catches it.
    """


def check_dim(dim: object, width: int, name: str = "truncate_dim") -> int:
    """`dim` as an int in 1..width, or one sentence naming `name` and the model's width."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise ConventionError(f"{name} must be a whole number, got {dim!r}")
    if not 1 <= int(dim) <= width:
        raise ConventionError(
            f"{name} must be between 1 and the model's embedding width {width}, got {dim}"
        )
    return int(dim)


def truncate_dims(vectors: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
    """Keep the first `dim` columns; renormalise rows to unit length when `normalize`.

    Renormalising keeps a normalised model's promise (cosine == dot product) after the cut,
    as OpenAI's `dimensions` and sentence-transformers' `truncate_dim` with normalisation do.
    A zero row stays zero rather than becoming NaN. Works on one vector (1-D) or a matrix.
    """
    vectors = np.asarray(vectors)
    width = vectors.shape[-1]
    dim = check_dim(dim, width)
    out = np.array(vectors[..., :dim], dtype=np.float32, copy=True)
    if normalize:
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    return out


def check_precision(precision: object) -> str:
    """`precision` if it is one sentence-transformers names, else one sentence listing them."""
    if precision not in PRECISIONS:
        names = ", ".join(PRECISIONS)
        raise ConventionError(f"precision must be one of {names}, got {precision!r}")
    return str(precision)


def quantization_ranges(calibration: np.ndarray, precision: str = "int8") -> np.ndarray:
    """Per-dimension (min, max) rows, shape (2, dim), as sentence-transformers computes them.

    Ranges from one vector would make every dimension a zero-width bucket, so that is refused
    (sentence-transformers refuses it too): pass `calibration_embeddings` or more texts.
    """
    calibration = np.asarray(calibration, dtype=np.float32)
    if calibration.ndim != 2 or calibration.shape[0] < 2:
        raise ConventionError(
            f"{precision} quantization needs ranges from at least 2 embeddings; "
            "pass calibration_embeddings from a representative set of texts"
        )
    if not np.isfinite(calibration).all():
        raise ConventionError(f"{precision} calibration embeddings must be finite")
    return np.vstack((calibration.min(axis=0), calibration.max(axis=0)))


def quantize_embeddings(
    embeddings: np.ndarray,
    precision: str,
    ranges: np.ndarray | None = None,
    calibration_embeddings: np.ndarray | None = None,
) -> np.ndarray:
    """Quantize float embeddings to `precision`, exactly as sentence-transformers does.

    int8/uint8: 256 equal buckets per dimension between that dimension's min and max, taken
    from `ranges` (shape (2, dim)), else from `calibration_embeddings`, else from `embeddings`
    themselves (then a vector's code depends on the others in the call; pass ranges or
    calibration embeddings for codes that are stable across calls). binary/ubinary: the sign
    bit of each dimension, packed 8 to a byte (binary is ubinary - 128, as int8).
    """
    precision = check_precision(precision)
    embeddings = np.asarray(embeddings)
    if embeddings.dtype in (np.int8, np.uint8):
        raise ConventionError("embeddings to quantize must be floats, not int8 or uint8")
    width = embeddings.shape[-1]
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision.endswith("binary"):
        packed = np.packbits(embeddings > 0, axis=-1)
        return (packed - 128).astype(np.int8) if precision == "binary" else packed
    if calibration_embeddings is not None and np.shape(calibration_embeddings)[-1] != width:
        raise ConventionError(
            f"calibration_embeddings have {np.shape(calibration_embeddings)[-1]} dimensions, "
            f"the embeddings {width}"
        )
    if ranges is None:
        source = embeddings if calibration_embeddings is None else calibration_embeddings
        ranges = quantization_ranges(source, precision)
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.shape != (2, width) or not np.isfinite(ranges).all():
        raise ConventionError(
            f"ranges must be finite with shape (2, {width}), got shape {ranges.shape}"
        )
    starts = ranges[0, :]
    steps = (ranges[1, :] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    codes = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
    return codes.astype(np.uint8) if precision == "uint8" else (codes - 128).astype(np.int8)


# ---------------------------------------------------------------- encode's options

# sentence-transformers' encode options this runtime has no use for, with the value that
# means "as usual"; any other value is refused with the sentence below, never ignored.
ST_NEUTRAL: dict[str, Any] = {
    "convert_to_numpy": True,
    "convert_to_tensor": False,
    "output_value": "sentence_embedding",
    "device": None,
    "pool": None,
    "chunk_size": None,
}
_REFUSALS = {
    "convert_to_numpy": "the runtime returns numpy arrays only",
    "convert_to_tensor": "the runtime is torch-free and returns numpy arrays; wrap the "
    "result with torch.from_numpy(...)",
    "output_value": "the exported graph outputs only the pooled vector ('sentence_embedding'); "
    "token embeddings are not in it",
    "device": "the device is chosen when the model is loaded: Encoder(path, "
    "providers=['CUDAExecutionProvider']) or ['CPUExecutionProvider']",
    "pool": "for several processes use diffcse_runtime.parallel (ParallelEncoder)",
    "chunk_size": "it only applies to a multi-process pool; for several processes use "
    "diffcse_runtime.parallel (ParallelEncoder)",
}
# MTEB passes these to say which task and split it is encoding; they never change a vector
# (prompt_type picks the model's query/document prompt, as sentence-transformers does).
MTEB_CONTEXT = frozenset({"task_metadata", "hf_split", "hf_subset", "prompt_type", "task_name"})
# sentence-transformers' encode_query / encode_document prompt names, in its order
PROMPT_KINDS = {"query": ("query",), "document": ("document", "passage", "corpus")}


def check_extra_options(options: dict[str, Any]) -> str | None:
    """Refuse, in one sentence, an encode option that would be ignored; return the MTEB
    prompt_type ("query"/"document") if one was passed, else None."""
    for key, value in options.items():
        if key in MTEB_CONTEXT:
            continue
        if key not in ST_NEUTRAL:
            known = ", ".join(sorted([*ST_NEUTRAL, *MTEB_CONTEXT]))
            raise ConventionError(
                f"encode() got an unknown option {key!r} (besides its own parameters it "
                f"accepts only these sentence-transformers/MTEB ones: {known})"
            )
        neutral = ST_NEUTRAL[key]
        if not (value is neutral or (neutral is not None and _same(value, neutral))):
            raise ConventionError(
                f"encode option {key}={value!r} is not supported: {_REFUSALS[key]}"
            )
    kind = options.get("prompt_type")
    kind = getattr(kind, "value", kind)  # mteb's PromptType is a str Enum
    return kind if kind in PROMPT_KINDS else None


def _same(value: Any, neutral: Any) -> bool:
    return type(value) is type(neutral) and value == neutral


def resolve_prompt(
    prompts: dict[str, str],
    default_name: str | None,
    prompt: str | None = None,
    prompt_name: str | None = None,
    kind: str | None = None,
) -> str:
    """The text put before every input, with sentence-transformers' precedence.

    An explicit `prompt` (even "") wins; else `prompt_name` (must be one of the model's);
    else, for encode_query/encode_document (`kind`), the model's "query" or
    "document"/"passage"/"corpus" prompt when it has one; else `default_prompt_name`'s.
    Passing both `prompt` and `prompt_name` is refused (sentence-transformers warns and
    drops `prompt_name`): one of them would be ignored.
    """
    if prompt is not None and prompt_name is not None:
        raise ConventionError("pass prompt or prompt_name, not both: one would be ignored")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ConventionError(f"prompt must be a string, got {type(prompt).__name__}")
        return prompt
    if prompt_name is None and kind is not None:
        prompt_name = next((n for n in PROMPT_KINDS[kind] if n in prompts), None)
    if prompt_name is not None:
        if prompt_name not in prompts:
            names = ", ".join(map(repr, prompts)) or "none"
            raise ConventionError(
                f"prompt_name {prompt_name!r} is not one of this model's prompts ({names}; "
                "set with diffcse-export --prompt NAME=TEXT)"
            )
        return prompts[prompt_name]
    return prompts[default_name] if default_name else ""


@dataclass(frozen=True)
class Finish:
    """What happens to the graph's float32 rows before encode returns them."""

    truncate_dim: int | None = None
    normalize: bool = False  # the caller asked for unit rows
    model_normalized: bool = False  # the graph's rows are unit already
    precision: str = "float32"
    ranges: np.ndarray | None = None
    calibration_embeddings: np.ndarray | None = None

    def apply(self, out: np.ndarray) -> np.ndarray:
        """Truncate (renormalising unit rows), normalise, then quantize: ST's order."""
        if self.truncate_dim is not None and self.truncate_dim < out.shape[-1]:
            out = truncate_dims(out, self.truncate_dim, self.normalize or self.model_normalized)
        elif self.normalize:
            norms = np.linalg.norm(out, axis=-1, keepdims=True)
            out = out / np.maximum(norms, 1e-12)
        if self.precision == "float32":
            return out
        if out.shape[0] == 0 and self.precision.endswith("int8"):
            return np.zeros(out.shape, dtype=np.int8 if self.precision == "int8" else np.uint8)
        return quantize_embeddings(out, self.precision, self.ranges, self.calibration_embeddings)

    def check(self, rows: int, width: int) -> None:
        """Refuse, before any work, what `apply` would refuse after encoding `rows` texts."""
        if not self.precision.endswith("int8") or rows == 0:
            return
        out_width = min(self.truncate_dim or width, width)
        if self.ranges is not None and np.shape(self.ranges) != (2, out_width):
            raise ConventionError(
                f"ranges must have shape (2, {out_width}), got {np.shape(self.ranges)}"
            )
        calibration = self.calibration_embeddings
        if calibration is not None and np.shape(calibration)[-1:] != (out_width,):
            raise ConventionError(
                f"calibration_embeddings must be a (n, {out_width}) array of embeddings from "
                f"this model, got shape {np.shape(calibration)}"
            )
        if self.ranges is None and calibration is None and rows < 2:
            raise ConventionError(
                f"precision={self.precision!r} takes its ranges from the embeddings of the "
                "call, and one text gives none: pass calibration_embeddings (embeddings of a "
                "representative set of texts) or ranges"
            )


# ---------------------------------------------------------------- prompts at export

ST_SETTINGS_FILE = "config_sentence_transformers.json"  # a source folder's own prompts
_ST_DEFAULT_PROMPTS = ("query", "document")  # sentence-transformers 5+ adds these, empty


def read_source_prompts(folder: str | Path) -> tuple[dict[str, str], str | None]:
    """The prompts and default prompt name a sentence-transformers folder declares.

    The empty "query"/"document" prompts sentence-transformers 5+ writes are its defaults,
    and the runtime's too, so they are left out (a folder without other prompts stays a
    format-1 model directory).
    """
    path = Path(folder) / ST_SETTINGS_FILE
    if not path.is_file():
        return {}, None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffcseError(f"{path}: cannot be read as JSON ({exc})") from None
    prompts = raw.get("prompts") if isinstance(raw, dict) else None
    default = raw.get("default_prompt_name") if isinstance(raw, dict) else None
    if prompts is None:
        prompts = {}
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise DiffcseError(f"{path}: 'prompts' must map names to prompt strings")
    if default is not None and not isinstance(default, str):
        raise DiffcseError(f"{path}: 'default_prompt_name' must be a string or null")
    kept = {k: v for k, v in prompts.items() if v or k not in _ST_DEFAULT_PROMPTS}
    return kept, default or None


def pooling_includes_prompt(folder: str | Path) -> bool:
    """False when a sentence-transformers folder's Pooling leaves prompt tokens out of its
    mean (`include_prompt: false`, e.g. INSTRUCTOR-style models); the exported graph always
    averages every real token, so such a model's prompted vectors cannot be reproduced."""
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        for module in modules:
            if str(module.get("type", "")).endswith(".Pooling"):
                config = folder / str(module.get("path", "")) / "config.json"
                return json.loads(config.read_text(encoding="utf-8")).get("include_prompt", True)
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no (readable) sentence-transformers stack: the checkpoint's own files rule
    return True


def export_prompts(
    folder: str | Path,
    pooling: str,
    given: dict[str, str] | None,
    default_name: str | None,
) -> tuple[dict[str, str], str | None]:
    """The prompts diffcse-export records: the source's own, then `--prompt NAME=TEXT`
    (replacing a same-named one), and the default name (given, else the source's)."""
    prompts, source_default = read_source_prompts(folder)
    prompts.update(given or {})
    if problem := field_problem("prompts", prompts):
        raise DiffcseError(f"prompts {problem}")
    default_name = default_name or source_default
    if default_name is not None and default_name not in prompts:
        names = ", ".join(prompts) or "none"
        raise DiffcseError(
            f"default prompt name {default_name!r} is not one of the prompts ({names})"
        )
    if prompts and pooling == "mean" and not pooling_includes_prompt(folder):
        raise DiffcseError(
            f"{folder}: its Pooling leaves prompt tokens out of the mean (include_prompt: "
            "false), which the exported graph cannot do; its prompted vectors would differ"
        )
    return prompts, default_name

"""The embedding conventions users bring from sentence-transformers and OpenAI clients.

Matryoshka-style truncation (`truncate_dim`, OpenAI's `dimensions`) and scalar/binary
quantization (`precision`) live here, numpy-only, so `Encoder.encode`, the server and any
other caller apply them the one same way. `quantize_embeddings` reproduces
`sentence_transformers.quantization.quantize_embeddings` bit for bit (a test compares them),
so vectors quantized here can be searched against ones quantized there.
"""

from __future__ import annotations

import numpy as np

from diffcse_runtime.errors import DiffcseError

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

"""MTEB's two encode protocols on one `Encoder.encode`, without importing torch or mteb.

MTEB v1 (and sentence-transformers) call `encode(list[str], batch_size=..., **kwargs)`.
MTEB v2 calls `encode(inputs: DataLoader[BatchedInput], *, task_metadata, hf_split,
hf_subset, prompt_type, **kwargs)`, where each batch is a dict whose "text" field holds the
batch's strings (already composed with any instruction; retrieval corpora also carry
"title"/"body", queries "query"/"instruction"), and reads the model's `mteb_model_meta`.

`texts_of` turns a v2 loader into the list of its texts and passes everything else through
unchanged, so `Encoder.encode` keeps one code path (and its own length-sorted batching: the
loader's batches are only how MTEB hands the texts over). A DataLoader is recognised by its
attributes, never by importing torch, and generators of strings are not consumed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

TEXT_FIELD = "text"


def is_batch_loader(value: Any) -> bool:
    """True for a torch DataLoader (or a look-alike: batches + dataset + collate_fn)."""
    if isinstance(value, str | bytes | list | tuple | Mapping):
        return False
    cls = type(value)
    if cls.__name__ == "DataLoader" and cls.__module__.startswith("torch.utils.data"):
        return True
    return all(hasattr(value, name) for name in ("dataset", "batch_size", "collate_fn"))


def texts_of(inputs: Any) -> Any:
    """A v2 `DataLoader[BatchedInput]` -> list[str]; any other value is returned as given."""
    if not is_batch_loader(inputs):
        return inputs
    texts: list[str] = []
    for number, batch in enumerate(inputs):
        if not isinstance(batch, Mapping) or TEXT_FIELD not in batch:
            keys = ", ".join(map(str, batch)) if isinstance(batch, Mapping) else type(batch)
            raise TypeError(
                f"MTEB batch {number} has no {TEXT_FIELD!r} field (it has: {keys}); "
                "this encoder embeds text only"
            )
        texts.extend(batch[TEXT_FIELD])
    return texts


def model_meta(encoder: Any) -> Any:
    """The `mteb.models.ModelMeta` MTEB v2 reads from `encoder.mteb_model_meta`.

    Named `diffcse/<folder>` with the graph's SHA-256 prefix as revision, so MTEB's result
    cache keeps each exported model's scores apart. Raises AttributeError (not ImportError)
    without mteb, so `hasattr(encoder, "mteb_model_meta")` stays a plain False.
    """
    try:
        from mteb.models.model_meta import ModelMeta, ScoringFunction
    except ImportError:
        raise AttributeError("mteb_model_meta needs the mteb package (pip install mteb)") from None
    meta = encoder.meta
    return ModelMeta.create_empty(
        overwrites={
            "name": f"diffcse/{encoder.path.resolve().name}",
            "revision": meta.onnx_sha256[:12] or "unknown",
            "embed_dim": encoder.get_sentence_embedding_dimension(),  # truncate_dim counts
            "max_tokens": meta.max_seq_length,
            "similarity_fn_name": ScoringFunction.COSINE,
            "framework": ["ONNX"],
            "languages": None,
            "open_weights": True,
            "use_instructions": False,
        }
    )


def pairwise_cosine(a: Any, b: Any) -> np.ndarray:
    """Row-wise cosine of two (n, d) arrays, float32; zero rows give 0."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float32))
    b = np.atleast_2d(np.asarray(b, dtype=np.float32))
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)

"""Make a training output's `best/` also a sentence-transformers folder.

Without these files `SentenceTransformer(best)` still loads the folder, but it builds its
default (mean) pooling on top of the encoder: a [CLS]-trained model then silently returns
a vector it was never trained for. Writing `modules.json` + `1_Pooling/config.json` with
the pooling actually trained (and `2_Normalize` when the source had one) makes every
sentence-transformers user get the same vector as the trainer's dev score and the exported
graph. The pooling files themselves come from the runtime (`diffcse_runtime.pooling`), the
one reader and writer of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffcse_runtime import builtin
from diffcse_runtime.atomic import atomic_file
from diffcse_runtime.pooling import write_st_modules

ST_CONFIG_FILE = "config_sentence_transformers.json"
ST_BERT_CONFIG = "sentence_bert_config.json"


def max_positions(encoder) -> int | None:
    """Positions the encoder can embed; RoBERTa-style tables lose padding_idx + 1 rows."""
    table = getattr(getattr(encoder, "embeddings", None), "position_embeddings", None)
    rows = getattr(table, "num_embeddings", None)
    if rows is None:
        return None
    padding_idx = getattr(table, "padding_idx", None)
    return int(rows) - (padding_idx + 1 if padding_idx is not None else 0)


def source_max_seq_length(model_name_or_path: str) -> int | None:
    """The source's own sentence-transformers limit (MiniLM: 256), part of its native vector."""
    path = builtin.model_path(model_name_or_path) / ST_BERT_CONFIG
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_seq_length")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def st_max_seq_length(encoder, tokenizer, model_name_or_path: str) -> int:
    """The truncation a sentence-transformers user gets: the source's own limit, else the
    tokenizer's, capped by the position table (the same rule diffcse-export applies)."""
    positions = max_positions(encoder)
    limits = [positions] if positions else []
    native = source_max_seq_length(model_name_or_path)
    if native is not None:
        limits.append(native)
    elif tokenizer.model_max_length < 1e6:
        limits.append(int(tokenizer.model_max_length))
    return min(limits) if limits else 512


def write_sentence_transformers_files(folder: Path, model, tokenizer, model_name_or_path: str):
    """modules.json, 1_Pooling (+ 2_Normalize), sentence_bert_config.json and
    config_sentence_transformers.json for the DiffCSE model `model` saved in `folder`."""
    import torch
    import transformers

    pooling = getattr(model, "pooling", "cls")
    normalize = bool(getattr(model, "normalize", False))
    dim = int(model.encoder.config.hidden_size)
    max_len = st_max_seq_length(model.encoder, tokenizer, model_name_or_path)
    write_st_modules(folder, pooling, dim, normalize=normalize, max_seq_length=max_len)
    config = {
        "model_type": "SentenceTransformer",
        "__version__": {
            # the first release that reads similarity_fn_name; sentence-transformers warns
            # only when this is newer than the reader (no install of it is needed to write)
            "sentence_transformers": "3.0.0",
            "transformers": transformers.__version__,
            "pytorch": torch.__version__,
        },
        "prompts": {},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    with atomic_file(Path(folder) / ST_CONFIG_FILE, "w") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")

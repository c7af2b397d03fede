"""Embed a corpus on Ray Data (the optional extra `diffcse[ray]`).

- `TextEmbedder`: a callable class for `ray.data.Dataset.map_batches` with an actor pool;
  each actor builds one `Encoder` and adds an embedding column to every batch.
- `run_job` / the `diffcse-embed-ray` command: text, JSONL or Parquet in, Parquet parts and a
  manifest out, resumable, on a local Ray or an existing cluster.

`diffcse_runtime` itself never imports this package: the base install has no Ray. Names are
loaded on first use, so `diffcse-embed-ray` without the extra can say what to install
instead of failing on an import.
"""

from __future__ import annotations

import importlib

FORMATS = ("auto", "text", "jsonl", "parquet")
_WHERE = {
    "TextEmbedder": "batch",
    "embedding_array": "batch",
    "text_hashes": "batch",
    "JobResult": "job",
    "JobSpec": "job",
    "ShardWriter": "job",
    "run_job": "job",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)

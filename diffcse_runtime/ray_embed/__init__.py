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

from diffcse_runtime.extras import lazy_names

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

__getattr__, __dir__ = lazy_names(__name__, _WHERE)

"""Embed a corpus on Ray Data (the optional extra `diffcse[ray]`).

- `TextEmbedder`: a callable class for `ray.data.Dataset.map_batches` with an actor pool;
  each actor builds one `Encoder` and adds an embedding column to every batch.
- `run_job` / the `diffcse-embed-ray` command: text, JSONL or Parquet in, Parquet parts and a
  manifest out, resumable, on a local Ray or an existing cluster.

`diffcse_runtime` itself never imports this package: the base install has no Ray.
"""

from diffcse_runtime.ray_embed.batch import TextEmbedder, embedding_array, text_hashes
from diffcse_runtime.ray_embed.job import JobResult, JobSpec, ShardWriter, run_job

__all__ = [
    "JobResult",
    "JobSpec",
    "ShardWriter",
    "TextEmbedder",
    "embedding_array",
    "run_job",
    "text_hashes",
]

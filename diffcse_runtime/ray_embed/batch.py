"""`TextEmbedder`: the callable class that `ray.data.Dataset.map_batches` runs in each actor.

Ray Data builds one instance per actor, so the onnxruntime session is created once per
actor and reused for every batch; that is why this is a class and not a function. The
embedding column is a fixed-size list of float32 (`fixed_size_list<float>[d]`), the Arrow
type that Parquet, Spark, pandas and vector databases all read as "one vector per row".
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from diffcse_runtime.encoder import Encoder
from diffcse_runtime.errors import DataFormatError

HASH_BYTES = 16  # 128-bit: a 64-bit hash would collide with ~3% odds across 1B rows


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 -> a fixed-size-list Arrow column, without copying the values."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def text_hashes(texts: list[str]) -> pa.FixedSizeBinaryArray:
    """BLAKE2b-128 of each text's UTF-8 bytes: lets a later job dedup or match rows cheaply."""
    digests = [hashlib.blake2b(t.encode("utf-8"), digest_size=HASH_BYTES).digest() for t in texts]
    return pa.array(digests, type=pa.binary(HASH_BYTES))


def _texts(column: Any, name: str) -> list[str]:
    values = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            got = "null" if value is None else type(value).__name__
            raise DataFormatError(f"column {name!r}, row {i} of the batch: {got}, expected text")
    return values


def _share_tokenizer_threads(threads: int) -> None:
    """Inside a Ray actor, give the tokenizers library's Rust pool the actor's share of the
    cores too (it reads RAYON_NUM_THREADS when first used), as diffcse-embed's workers do;
    left alone, every actor's pool would start one thread per core of the node."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        os.environ["RAYON_NUM_THREADS"] = str(threads)


class TextEmbedder:
    """Add an embedding column to each batch: use with `map_batches` and an actor pool.

    >>> ds.map_batches(TextEmbedder, fn_constructor_kwargs={"model_dir": "model"},
    ...                batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=4),
    ...                num_cpus=1)

    Batches may be pyarrow Tables (the output column is then `fixed_size_list<float>[d]`),
    pandas DataFrames or dicts of numpy arrays (then an (n, d) float32 array). Give every
    actor `intra_op_threads` equal to its `num_cpus`: one thread per reserved core is what
    the benchmarks measured as the best use of a core (benchmarks/notes/runtime.md).
    """

    def __init__(
        self,
        model_dir: str | Path,
        text_column: str = "text",
        output_column: str = "embedding",
        intra_op_threads: int = 1,
        batch_size: int = 64,
        normalize: bool = False,
        backend: str = "auto",
        inference_precision: str = "f32",
    ) -> None:
        """`backend`, `inference_precision`: as `Encoder`'s (OpenVINO needs the openvino
        extra on every worker)."""
        _share_tokenizer_threads(intra_op_threads)
        self.encoder = Encoder(
            model_dir,
            intra_op_threads=intra_op_threads,
            backend=backend,
            inference_precision=inference_precision,
        )
        self.text_column = text_column
        self.output_column = output_column
        self.batch_size = batch_size
        self.normalize = normalize

    @property
    def embedding_dim(self) -> int:
        return self.encoder.embedding_dim

    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, d) float32 for `texts`, in order; exactly what `Encoder.encode` returns."""
        return self.encoder.encode(
            texts, batch_size=self.batch_size, normalize=self.normalize, show_progress_bar=False
        )

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, pa.Table):
            if self.text_column not in batch.column_names:
                raise DataFormatError(
                    f"no {self.text_column!r} column in the batch (columns: {batch.column_names})"
                )
            vectors = self.embed(_texts(batch.column(self.text_column), self.text_column))
            return batch.append_column(self.output_column, embedding_array(vectors))
        if self.text_column not in batch:
            raise DataFormatError(
                f"no {self.text_column!r} column in the batch (columns: {list(batch.keys())})"
            )
        vectors = self.embed(_texts(batch[self.text_column], self.text_column))
        if hasattr(batch, "assign"):  # pandas: one array per row, as Ray Data expects
            return batch.assign(**{self.output_column: list(vectors)})
        batch[self.output_column] = vectors
        return batch

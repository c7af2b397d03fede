"""Embed texts in a Ray Data pipeline of your own with TextEmbedder (one Encoder per actor).

    python examples/ray_job.py my-model out-parquet/

Runs on a local Ray here; on a cluster, `ray.init(address="auto")` and paths every node sees
(the model folder too). For whole files, `diffcse-embed-ray` does the same with resume.
"""

from __future__ import annotations

import sys

import ray

from diffcse_runtime.ray_embed import TextEmbedder


def main(model_dir: str, out: str) -> None:
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        texts = [f"Sentence number {i} about a topic." for i in range(1000)]
        ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
        ds = ds.map_batches(
            TextEmbedder,
            fn_constructor_kwargs={"model_dir": model_dir, "normalize": True},
            batch_format="pyarrow",
            batch_size=256,
            num_cpus=1,  # ray.data.from_items needs no read tasks; leave room if you read files
            compute=ray.data.ActorPoolStrategy(size=1),
        )
        ds.write_parquet(out)
        print(f"wrote {ds.count()} rows with columns {ds.columns()} to {out}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "my-model",
        sys.argv[2] if len(sys.argv) > 2 else "out-parquet",
    )

"""Encode a small corpus and search it, with the runtime alone (no torch).

diffcse-export builtin:all-MiniLM-L6-v2 my-model      # once: a first model
python examples/encode_search.py my-model "how do plants make food"
"""

from __future__ import annotations

import sys

from diffcse_runtime import Encoder
from diffcse_runtime.retrieval import Index

CORPUS = [
    "Plants make their food from sunlight, water and carbon dioxide.",
    "The stock market fell sharply on Monday.",
    "A recipe for a quick tomato soup.",
    "Photosynthesis takes place in the chloroplasts of leaf cells.",
    "The football team won the championship.",
]


def main(model_dir: str, query: str) -> None:
    encoder = Encoder(model_dir)
    index = Index.build(encoder, CORPUS)  # unit-normalised rows; cosine top-k
    for hit in index.search(encoder, query, k=3)[0]:
        print(f"{hit.score:.3f}  {hit.text}")

    # The vectors themselves, for your own store:
    vectors = encoder.encode(CORPUS, normalize=True)
    print(f"{vectors.shape[0]} vectors of {vectors.shape[1]} dimensions")


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "my-model",
        sys.argv[2] if len(sys.argv) > 2 else "how do plants make food",
    )

"""Call diffcse-serve with the official OpenAI client.

DIFFCSE_API_KEY=my-key diffcse-serve --model my-model --port 8080 &
DIFFCSE_API_KEY=my-key python examples/openai_client.py http://127.0.0.1:8080/v1
"""

from __future__ import annotations

import base64
import os
import sys

import numpy as np
from openai import OpenAI


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key=os.environ.get("DIFFCSE_API_KEY", "unused"))
    model = client.models.list().data[0].id  # the first model the server serves
    texts = ["A man plays a guitar.", "Someone is playing music.", "The market fell today."]

    result = client.embeddings.create(model=model, input=texts)
    vectors = np.array([d.embedding for d in result.data], dtype=np.float32)
    print(f"model {model}: {vectors.shape}, {result.usage.prompt_tokens} tokens")
    print("cosine(guitar, music) =", round(float(vectors[0] @ vectors[1]), 3))  # unit vectors
    print("cosine(guitar, market) =", round(float(vectors[0] @ vectors[2]), 3))

    # base64 halves the response size: little-endian float32, as OpenAI sends it
    raw = client.embeddings.create(model=model, input=texts[:1], encoding_format="base64")
    packed = raw.data[0].embedding
    if isinstance(packed, str):  # some client versions decode base64 themselves
        packed = np.frombuffer(base64.b64decode(packed), dtype="<f4")
    print("base64 row equals the float row:", np.allclose(packed, vectors[0], atol=1e-6))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1")

"""diffcse-serve: an OpenAI-compatible embeddings server on the runtime (extra `serve`).

Install with `pip install "diffcse[serve]"`. `diffcse_runtime` itself never imports this
package, so the base install needs no web stack.
"""

from diffcse_runtime.serve.app import ServeSettings, create_app
from diffcse_runtime.serve.batching import BatchSettings

__all__ = ["BatchSettings", "ServeSettings", "create_app"]

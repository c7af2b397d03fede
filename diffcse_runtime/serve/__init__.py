"""diffcse-serve: an OpenAI-compatible embeddings server on the runtime (extra `serve`).

Install with `pip install "diffcse[serve]"`. `diffcse_runtime` itself never imports this
package, so the base install needs no web stack. Names load on first use (PEP 562), so the
`diffcse-serve` script (`main`) can say what to install when the web stack is missing.
"""

from __future__ import annotations

from diffcse_runtime.extras import entry_point, lazy_names

_HOME = {"ServeSettings": "served", "create_app": "app", "BatchSettings": "batching"}
__all__ = ["BatchSettings", "ServeSettings", "create_app"]

main = entry_point("diffcse-serve", "serve", "diffcse_runtime.serve.cli:serve")

__getattr__, __dir__ = lazy_names(__name__, _HOME)

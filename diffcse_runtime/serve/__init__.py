"""diffcse-serve: an OpenAI-compatible embeddings server on the runtime (extra `serve`).

Install with `pip install "diffcse[serve]"`. `diffcse_runtime` itself never imports this
package, so the base install needs no web stack. Names load on first use (PEP 562), so the
`diffcse-serve` script (`main`) can say what to install when the web stack is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

from diffcse_runtime.extras import entry_point

_HOME = {"ServeSettings": "served", "create_app": "app", "BatchSettings": "batching"}
__all__ = ["BatchSettings", "ServeSettings", "create_app"]

main = entry_point("diffcse-serve", "serve", "diffcse_runtime.serve.cli:serve")


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)

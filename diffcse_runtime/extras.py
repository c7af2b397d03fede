"""Console entry points of the optional extras: a missing dependency is one install line.

The base install is the runtime alone; `diffcse-train`, `diffcse-export` and `diffcse-serve`
need an extra (`train`, `export`, `serve`). Their scripts (pyproject.toml [project.scripts])
point at an `entry_point(...)` made here, which imports the real command only when it runs,
so on a slim install even `--help` prints `pip install "diffcse[train]"` instead of a
ModuleNotFoundError traceback. `diffcse-embed-ray` needs no wrapper: its command module
imports Ray only inside the command and says the same itself.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

OWN_PACKAGES = ("diffcse_runtime", "diffcse_train", "diffcse_export")


def install_hint(command: str, extra: str, missing: str) -> str:
    """The one sentence a command without its extra prints."""
    return (
        f"{command} needs the optional dependencies of diffcse[{extra}] (no module named "
        f'{missing!r}): pip install "diffcse[{extra}]"'
    )


def entry_point(command: str, extra: str, target: str) -> Callable[[], None]:
    """A console script that runs `target` ("module:function"), or prints the install hint
    for `extra` when a third-party module it needs is missing (at import or later)."""
    module_name, _, attr = target.partition(":")

    def main() -> None:
        try:
            getattr(importlib.import_module(module_name), attr)()
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if not top or top in OWN_PACKAGES:
                raise  # our own module missing is a broken install, not a missing extra
            print(f"Error: {install_hint(command, extra, top)}", file=sys.stderr)
            sys.exit(1)

    main.__doc__ = f"`{command}` (needs the `{extra}` extra)."
    return main


def lazy_names(package: str, home: dict[str, str]) -> tuple[Callable, Callable]:
    """A package's PEP 562 `__getattr__` and `__dir__` that import each public name from
    its module (`home[name]`, relative to `package`) on first use, so importing the package
    needs none of its extra's dependencies and `main` can name what to install."""

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(home))

    return __getattr__, __dir__

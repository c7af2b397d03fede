"""Model folders that would run their own code are refused before transformers reads them.

A Hugging Face folder can map its config, model or tokenizer class to a `.py` file beside it
(`auto_map`); loading it then imports that file, which runs whatever it holds. transformers
asks "run the custom code? [y/N]" on a terminal, and a piped `y` answers it. diffcse never
runs code from a model folder: diffcse-train and diffcse-export call `refuse_custom_code`
before loading a folder, and pass `trust_remote_code=False` to every loading call, so a hub
id (not on disk to check) is refused by transformers itself. Torch-free, so both packages use
it without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffcse_runtime.errors import DiffcseError

# The files whose `auto_map` makes AutoConfig/AutoModel/AutoTokenizer import a .py file.
MAPPED_FILES = ("config.json", "tokenizer_config.json", "processor_config.json")


def custom_code_entry(folder: Path) -> tuple[str, str] | None:
    """(file name, first auto_map entry) when `folder` maps a class to its own code."""
    for name in MAPPED_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # unreadable: transformers' own loading reports it
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            if isinstance(auto_map, dict):
                key, target = next(iter(auto_map.items()))
                return name, f"{key}: {json.dumps(target)}"
            return name, json.dumps(auto_map)
    return None


def refuse_custom_code(folder: str | Path, label: str = "") -> None:
    """Raise a DiffcseError naming the folder and its auto_map entry if it ships code.

    `label` prefixes the message with where the folder came from (a config key, an option).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    found = custom_code_entry(folder)
    if found is None:
        return
    name, entry = found
    prefix = f"{label} " if label else ""
    raise DiffcseError(
        f"{prefix}{folder}: {name} has an auto_map entry ({entry}) that would run Python code "
        "from the model folder, which diffcse never does; use a model whose architecture "
        "transformers ships"
    )

"""tokenizer_config.json and special_tokens_map.json beside a model directory's tokenizer.json.

The runtime needs only tokenizer.json. Hugging Face tooling (`AutoTokenizer`) and
fastembed's custom-model path also read these two small files: the tokenizer class, the
special tokens (fastembed takes the pad token from them) and `model_max_length`, which
both use as the truncation limit. So `model_max_length` is always the graph's own
`max_seq_length`: any tool reading the directory truncates exactly where our Encoder does.

The source folder's own files are copied when present (they may carry settings such as
`do_lower_case` that other tools read); otherwise both are derived from the loaded tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffcse_runtime.atomic import atomic_file

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# transformers 5 names its generic class TokenizersBackend; older releases know it only as
# PreTrainedTokenizerFast (still an alias in 5), so the directory loads with either.
_PORTABLE_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
_KEEP_OUT = ("name_or_path", "auto_map")  # a path on the export host; remote code


def _read_object(path: Path) -> dict[str, Any] | None:
    """A source file's JSON object, or None when absent or unreadable (then we derive)."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def special_tokens(source: Path, tokenizer: Any) -> dict[str, Any]:
    """The source's special_tokens_map.json, else the tokenizer's named special tokens."""
    found = _read_object(source / SPECIAL_TOKENS_MAP)
    if found is not None:
        return found
    return {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}


def tokenizer_config(source: Path, tokenizer: Any, max_seq_length: int) -> dict[str, Any]:
    """The source's tokenizer_config.json (or a derived one) with our truncation limit."""
    config = _read_object(source / TOKENIZER_CONFIG)
    if config is None:
        config = {"tokenizer_class": type(tokenizer).__name__, **special_tokens(source, tokenizer)}
    config = {k: v for k, v in config.items() if k not in _KEEP_OUT}
    cls = config.get("tokenizer_class")
    config["tokenizer_class"] = _PORTABLE_CLASS.get(cls, cls) or "PreTrainedTokenizerFast"
    if tokenizer.pad_token is not None:
        config.setdefault("pad_token", str(tokenizer.pad_token))
    config["model_max_length"] = int(max_seq_length)
    config.pop("max_length", None)  # fastembed takes the smaller of the two
    return config


def write_tokenizer_files(folder: Path, source: Path, tokenizer: Any, max_seq_length: int) -> None:
    """Write both files into the (staged) model directory `folder`."""
    for name, value in (
        (TOKENIZER_CONFIG, tokenizer_config(source, tokenizer, max_seq_length)),
        (SPECIAL_TOKENS_MAP, special_tokens(source, tokenizer)),
    ):
        with atomic_file(Path(folder) / name, "w") as fh:
            json.dump(value, fh, indent=2, sort_keys=True)
            fh.write("\n")

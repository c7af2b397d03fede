"""What the runtime accepts as texts, and the one sentence for what it refuses.

`Encoder.encode`, `Encoder.embed` and `diffcse_runtime.parallel` check input here, so a
wrong type gets the same message everywhere, naming the item's position in the whole input.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from diffcse_runtime.errors import DiffcseError

# A lone surrogate is a str Python allows but no tokenizer takes (it is not valid Unicode:
# JSON's "\ud800" or a surrogateescape'd byte gives one); one C-speed scan, no copy.
_SURROGATE = re.compile("[\ud800-\udfff]")


class TextValueError(DiffcseError, ValueError):
    """A text that is a str but cannot be tokenized, named by its position in the input."""


def as_text_list(texts: Any) -> tuple[list[str], bool]:
    """`texts` as a list of str plus whether it was one string; refuse what is not text.

    Bytes are iterable (of ints) and a dict iterates its keys, so both would otherwise be
    encoded silently and wrongly; a set has no order, so row i could not be matched to a text.
    """
    if isinstance(texts, str):
        _check_text(texts, 0)
        return [texts], True
    _refuse_container(texts)
    batch = list(texts)
    for i, text in enumerate(batch):
        _check_text(text, i)
    return batch, False


def _refuse_container(texts: Any) -> None:
    if isinstance(texts, bytes | bytearray | memoryview):
        raise TypeError("texts is bytes, not text: decode it to str first, e.g. data.decode()")
    if isinstance(texts, Mapping):
        raise TypeError(
            "texts is a dict: pass a list of str (a dict would give its keys), "
            "e.g. list(d.values())"
        )
    if isinstance(texts, set | frozenset):
        raise TypeError("texts is a set, which has no order: pass a list so row i is text i")
    if not isinstance(texts, Iterable):
        raise TypeError(f"texts is {type(texts).__name__}: expected str or a list of str")


def _check_text(text: Any, i: int) -> None:
    if isinstance(text, str):
        if not text.isascii() and (bad := _SURROGATE.search(text)):
            raise TextValueError(
                f"texts[{i}] holds a lone surrogate (U+{ord(bad.group()):04X} at character "
                f"{bad.start()}), which is not valid Unicode; decode the source with "
                "errors='replace' or fix the text"
            )
        return
    if isinstance(text, bytes | bytearray):
        raise TypeError(f"texts[{i}] is bytes, not text: decode it to str first")
    raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")


def iter_text_chunks(texts: Iterable[str], chunk_size: int) -> Iterator[list[str]]:
    """Lists of up to `chunk_size` texts from any iterable, each text type-checked with its
    position in the whole input, so an error names the item even deep into a generator."""
    if isinstance(texts, str):
        texts = [texts]
    _refuse_container(texts)
    it = iter(texts)
    start = 0
    while chunk := list(itertools.islice(it, chunk_size)):
        for offset, text in enumerate(chunk):
            _check_text(text, start + offset)
        yield chunk
        start += len(chunk)

"""Truncation made visible: per-text token counts, running totals and the warning.

The cut that bounds work per text lives in `Encoder._find_cuts` (it needs the tokenizer);
this module holds what it reports: `TokenCounts` per call, `TruncationTally` over many chunks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

log = logging.getLogger("diffcse_runtime")


class Cut(NamedTuple):
    at: int  # characters kept
    tokens: int  # tokens counted within them, special tokens included
    proven: bool  # the kept tokens are exactly those of the whole text


@dataclass(frozen=True)
class TokenCounts:
    """Tokens per text before truncation (special tokens included), in input order.

    `counts[i] > max_seq_length` means text i was truncated. A text longer than the
    tokenizing window (`windowed[i]`) is counted within that window only, so its count is a
    lower bound: counting all of a 10 MB line is the work the window exists to avoid.
    `hard_cut[i]` marks a text cut at the hard bound of `cut_chars` characters before its
    kept tokens could be proven complete (very long words or whitespace runs); the model saw
    only that prefix, so it counts as truncated too, whatever its token count.
    """

    counts: np.ndarray  # int64 (n,)
    windowed: np.ndarray  # bool (n,)
    hard_cut: np.ndarray  # bool (n,)
    max_seq_length: int
    cut_chars: int = 0  # the hard bound on characters read per text

    @property
    def truncated(self) -> np.ndarray:
        """Boolean mask: the texts the model saw only a part of."""
        return (self.counts > self.max_seq_length) | self.hard_cut

    @property
    def cut_only(self) -> np.ndarray:
        """Boolean mask: texts cut at `cut_chars` characters though within the token limit
        there (the text after the cut was never read)."""
        return self.hard_cut & (self.counts <= self.max_seq_length)

    def tally(self) -> TruncationTally:
        tally = TruncationTally(self.max_seq_length)
        tally.add(self)
        return tally


@dataclass
class TruncationTally:
    """Running totals of truncation over many chunks, for one summary line at the end."""

    max_seq_length: int
    texts: int = 0
    truncated: int = 0
    longest: int = 0
    longest_is_lower_bound: bool = False
    cut_at_chars: int = 0  # of `truncated`: texts cut at the character bound only
    cut_chars: int = 0

    def add(self, counts: TokenCounts) -> None:
        self.texts += len(counts.counts)
        self.truncated += int(counts.truncated.sum())
        self.cut_at_chars += int(counts.cut_only.sum())
        self.cut_chars = max(self.cut_chars, counts.cut_chars)
        over = counts.counts * (counts.counts > self.max_seq_length)
        if len(over) and int(over.max()) > self.longest:
            i = int(over.argmax())
            self.longest = int(counts.counts[i])
            self.longest_is_lower_bound = bool(counts.windowed[i])

    def message(self) -> str | None:
        """One sentence, or None when nothing was truncated."""
        if not self.truncated:
            return None
        over = self.truncated - self.cut_at_chars
        bound = "at least " if self.longest_is_lower_bound else ""
        long = (
            f"were longer than max_seq_length={self.max_seq_length} tokens and were "
            f"truncated (longest: {bound}{self.longest} tokens)"
        )
        if not self.cut_at_chars:
            return f"{self.truncated} of {self.texts} texts {long}"
        cut = (
            f"{self.cut_at_chars} were cut at {self.cut_chars} characters, the most read per "
            "text, before reaching the token limit (long whitespace runs or words); the text "
            "after the cut was not embedded"
        )
        if not over:
            return f"{self.truncated} of {self.texts} texts were truncated: {cut}"
        return f"{self.truncated} of {self.texts} texts were truncated: {over} {long}; {cut}"


def kept_tokens_complete(word_ids: list[int | None], keep: int) -> bool:
    """True if the first `keep` tokens exist and all come from words before the last one."""
    if keep < 1:
        return True
    if len(word_ids) <= keep:
        return False
    kept, last = word_ids[keep - 1], word_ids[-1]
    return kept is not None and last is not None and kept < last


def warn_truncation(tally: TruncationTally) -> None:
    if message := tally.message():
        log.warning("diffcse_runtime: %s", message)

"""Truncation, bounded and made visible: where a long text is cut before tokenizing
(`find_cuts`), per-text token counts (`TokenCounts`), running totals over many chunks
(`TruncationTally`) and the warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

log = logging.getLogger("diffcse_runtime")
# Texts up to CUT_CHARS_PER_TOKEN * max_seq_length characters are tokenized whole (English
# averages ~4-5 characters per WordPiece/BPE token, so a text that fills the model is cut at
# about twice its needed length). Longer texts are tokenized within a window that grows by
# CUT_GROWTH until it provably holds every kept token, up to CUT_MAX_CHARS_PER_TOKEN *
# max_seq_length characters: the hard bound on work per text (~65k characters at 512).
CUT_CHARS_PER_TOKEN = 8
CUT_GROWTH = 4
CUT_MAX_CHARS_PER_TOKEN = 128
# Characters handed to one tokenizers call. It builds every Encoding of a call at once
# (~100-250 bytes per character measured, offsets and overflow pieces included), so calls of
# at most this many characters keep tokenizing within ~64 MB whatever the number of texts;
# the ids kept afterwards are at most max_seq_length per text.
TOKENIZE_CHUNK_CHARS = 1 << 18


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


def char_chunks(lengths: list[int], budget: int) -> Iterator[tuple[int, int]]:
    """(start, stop) runs of consecutive items of at most `budget` characters in all (at
    least one item each): the unit of one tokenizers call."""
    start, used = 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > budget:
            yield start, i
            start, used = i, 0
        used += n
    if start < len(lengths):
        yield start, len(lengths)


def find_cuts(
    long: dict[int, str], tokenizer: Tokenizer, max_seq_length: int, n_special: int
) -> dict[int, Cut]:
    """Where to cut each long text so that its kept tokens stay exactly the same.

    Why a cut is safe: normalizers and pre-tokenizers decide locally (lowercase, NFD,
    accents, splitting at whitespace and punctuation, GPT-2's byte-level regex,
    Metaspace), and WordPiece, BPE and Unigram tokenize each pre-tokenized word on its
    own. So in a prefix, every word before the last one (the one the cut may split) is
    tokenized exactly as in the full text. If the prefix's first `keep` content tokens
    all come from such words, truncating the full text keeps exactly those tokens. No
    fixed characters-per-token ratio can promise this (a 10k-character word is one
    [UNK]; whitespace runs make no tokens), so the window is checked, not assumed, and
    grows until the check passes or it reaches the hard bound, where the text is cut
    anyway and counted as truncated (`TokenCounts.hard_cut`).

    `tokenizer` must not truncate (the Encoder's untruncated copy): the check reads every
    token of the window. Returns the cut per text; texts that fit a grown window whole are
    left out.
    """
    keep = max_seq_length - n_special
    window = CUT_CHARS_PER_TOKEN * max_seq_length
    cap = CUT_MAX_CHARS_PER_TOKEN * max_seq_length
    cuts: dict[int, Cut] = {}
    while long:
        index = list(long)
        grow = {}
        for start, stop in char_chunks([window] * len(index), TOKENIZE_CHUNK_CHARS):
            part = index[start:stop]
            windows = [long[i][:window] for i in part]
            encodings = tokenizer.encode_batch(windows, add_special_tokens=False)
            for i, enc in zip(part, encodings, strict=True):
                complete = kept_tokens_complete(enc.word_ids, keep)
                if complete or window >= cap:
                    cuts[i] = Cut(window, len(enc) + n_special, complete)
                else:
                    grow[i] = long[i]
            del windows, encodings
        window = min(window * CUT_GROWTH, cap)
        long = {i: t for i, t in grow.items() if len(t) > window}
    return cuts

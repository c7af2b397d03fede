"""The sentences that fix the int8 variant's activation scales, and the batches they make.

Static quantization measures each activation's range once, at export, on real text, and
stores it in the graph: a text's vector then never depends on its batch neighbours (dynamic
quantization took one scale over the whole padded batch). The text is the user's own
(`--calibration-file`, one sentence per line) or the built-in English Wikipedia corpus;
never the STS data the gate scores with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from diffcse_runtime import builtin
from diffcse_runtime.errors import DataFormatError
from diffcse_runtime.textio import iter_lines

log = logging.getLogger("diffcse_export")
DEFAULT_SOURCE = "builtin:wiki_en"
MAX_SENTENCES = 300  # evenly spaced over the source; more moved no scale measurably
FEW_SENTENCES = 32  # fewer than this still works, with a warning
BATCH = 16  # rows per calibration batch


@dataclass(frozen=True)
class Calibration:
    """Sentences for calibration and where they came from (recorded in diffcse.json)."""

    sentences: tuple[str, ...]
    source: str  # "builtin:wiki_en" or the file as the user named it
    available: int  # sentences the source holds; `sentences` is an even sample of them

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "sentences": len(self.sentences),
            "available": self.available,
        }


def load_calibration(spec: str | Path | None) -> Calibration:
    """Read `spec` (a one-sentence-per-line UTF-8 file; None: the built-in corpus).

    Blank lines are skipped; a bad byte or an empty file is one sentence naming the file
    (and line), raised before any export work starts.
    """
    source = str(spec) if spec is not None else DEFAULT_SOURCE
    if builtin.is_builtin(source):
        every = builtin.corpus_sentences(source)
    else:
        try:
            every = [line for _, line in iter_lines(source) if line.strip()]
        except DataFormatError as exc:
            msg = str(exc).replace("fix the file or use --errors replace", "fix the file")
            raise DataFormatError(f"--calibration-file {msg}") from None
        if not every:
            raise DataFormatError(f"--calibration-file {source}: no sentences (the file is empty)")
    step = max(1, len(every) / MAX_SENTENCES)
    picked = tuple(every[int(i * step)] for i in range(min(len(every), MAX_SENTENCES)))
    if len(picked) < FEW_SENTENCES:
        log.warning(
            "--calibration-file %s: only %d sentences; a few hundred give steadier int8 scales",
            source,
            len(picked),
        )
    return Calibration(picked, source, len(every))


def calibration_feeds(
    sentences: tuple[str, ...] | list[str],
    tokenizer_file: Path,
    input_names: list[str],
    max_len: int,
) -> list[dict]:
    """Unpadded batches for `input_names`: sentences of equal token length batched together.

    Padded positions never reach a scale: their activations (a [PAD] token attending to the
    sentence) are no part of any vector, yet a min/max calibrator would count them.
    """
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.enable_truncation(max_len)
    by_length: dict[int, list[list[int]]] = {}
    for enc in tok.encode_batch(list(sentences)):
        by_length.setdefault(len(enc.ids), []).append(enc.ids)
    feeds = []
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), BATCH):
            ids = np.array(rows[start : start + BATCH], dtype=np.int64)
            values = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            feeds.append({name: values.get(name, np.zeros_like(ids)) for name in input_names})
    return feeds

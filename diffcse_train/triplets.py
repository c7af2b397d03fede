"""Supervised SimCSE's training data: (sent0, sent1[, hard_neg]) rows from CSV, TSV or JSONL.

The layout is SimCSE's own (`nli_for_simcse.csv`: a header row `sent0,sent1,hard_neg`):
sent0 is the anchor, sent1 its annotated positive (an entailment), hard_neg an optional
hard negative (a contradiction). Columns are found by name, in any order; hard_neg is on
every row or on none, because every batch of one file must have the same shape.

    .csv    comma-separated, RFC 4180 quoting ("a, b" and "" inside quotes), header row
    .tsv    tab-separated, no quoting (a field cannot hold a tab or a newline), header row
    .jsonl  one JSON object per line: {"sent0": ..., "sent1": ..., "hard_neg": ...}

`objective: auto` (the default) trains supervised when train_file ends in one of these and
its header (or first object) names sent0 and sent1. Every error is one sentence naming the
file and line. Bytes are decoded by the runtime's line reader, as the sentence corpus is.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from diffcse_runtime import builtin
from diffcse_runtime.errors import DataFormatError
from diffcse_runtime.textio import iter_lines

DELIMITERS = {".csv": ",", ".tsv": "\t", ".jsonl": None}  # None: JSON lines
REQUIRED = ("sent0", "sent1")
COLUMNS = (*REQUIRED, "hard_neg")
EXPECTED = "sent0, sent1 and optionally hard_neg"
ALL_OR_NONE = "hard_neg must be on every row or on none"


class Triplet(NamedTuple):
    """One supervised example: anchor, positive and (optionally) a hard negative."""

    sent0: str
    sent1: str
    hard_neg: str | None = None


@dataclass
class TripletFile:
    triplets: list[Triplet]
    hard_negatives: bool  # every row has a hard_neg
    blank_lines: int  # skipped, reported to the user
    source: str


def _suffix(spec: str) -> str:
    return Path(str(spec)).suffix.lower()


def _lines(spec: str, errors: str, label: str) -> Iterator[tuple[int, str]]:
    """(line number, text) from the runtime's reader, its errors in the config's terms."""
    try:
        for lineno, line in iter_lines(spec, errors=errors):
            yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line
    except DataFormatError as exc:
        msg = str(exc).replace("use --errors replace", "set encoding_errors=replace")
        raise DataFormatError(f"{label} {msg}") from None


def _quoting(delimiter: str) -> int:
    return csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE


def _first_keys(spec: str, errors: str, label: str) -> list[str]:
    """The header's column names (CSV/TSV) or the first object's keys (JSONL)."""
    delimiter = DELIMITERS[_suffix(spec)]
    for lineno, line in _lines(spec, errors, label):
        if not line.strip():
            continue
        if delimiter is not None:
            try:
                header = next(csv.reader([line], delimiter=delimiter, quoting=_quoting(delimiter)))
            except csv.Error:
                return []
            return [name.strip() for name in header]
        try:
            first = json.loads(line)
        except json.JSONDecodeError as exc:
            where = f"{label} {spec}:{lineno}"
            raise DataFormatError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        return list(first) if isinstance(first, dict) else []
    return []


def resolve_objective(objective: str, spec: str, errors: str = "strict") -> str:
    """`unsupervised` or `supervised` for this train_file; `auto` looks at the file.

    A .csv/.tsv/.jsonl file without sent0 and sent1 under auto is refused rather than read
    as sentences: its header line would silently become a training sentence.
    """
    label = "train_file"
    suffix = "" if builtin.is_builtin(spec) else _suffix(spec)
    if objective == "unsupervised":
        return objective
    if objective == "supervised":
        if suffix not in DELIMITERS:
            raise DataFormatError(
                f"objective supervised needs a .csv, .tsv or .jsonl train_file with columns "
                f"{EXPECTED}; got {spec}"
            )
        return objective
    if suffix not in DELIMITERS:
        return "unsupervised"
    keys = _first_keys(spec, errors, label)
    if all(k in keys for k in REQUIRED):
        return "supervised"
    raise DataFormatError(
        f"{label} {spec}: a {suffix} file under objective auto needs {EXPECTED} in its "
        f"{'first object' if suffix == '.jsonl' else 'header row'} to train supervised SimCSE "
        f"(found: {', '.join(keys)[:120] or 'nothing'}); "
        "set objective: unsupervised to train on its lines as plain sentences"
    )


def _check_names(names: list[str], where: str, what: str) -> None:
    """Known, unique names that include sent0 and sent1 (a typo would drop a column)."""
    for name in names:
        if name not in COLUMNS:
            raise DataFormatError(f"{where}: unknown {what} {name!r}; expected {EXPECTED}")
    if len(set(names)) != len(names):
        raise DataFormatError(f"{where}: a {what} is repeated ({', '.join(names)})")
    for name in REQUIRED:
        if name not in names:
            raise DataFormatError(f"{where}: no {what} {name!r}; expected {EXPECTED}")


def _triplet(fields: dict[str, object], where: str, hard: bool | None) -> Triplet:
    """Check one row's values (strings, not blank) and the all-or-none hard_neg rule."""
    for name, value in fields.items():
        if not isinstance(value, str):
            raise DataFormatError(f"{where}: {name} must be a string, got {json.dumps(value)[:40]}")
        if not value.strip():
            raise DataFormatError(
                f"{where}: empty {name}" + ("; " + ALL_OR_NONE) * (name == "hard_neg")
            )
    if hard is not None and hard != ("hard_neg" in fields):
        missing = (
            "no hard_neg, but earlier rows have one"
            if hard
            else "a hard_neg, but earlier rows have none"
        )
        raise DataFormatError(f"{where}: {missing}; {ALL_OR_NONE}")
    return Triplet(fields["sent0"], fields["sent1"], fields.get("hard_neg"))  # type: ignore[arg-type]


def _csv_rows(spec: str, errors: str, label: str, delimiter: str) -> Iterator[tuple[int, dict]]:
    """(line, {column: value}) per data row; blank lines are yielded as (line, {})."""
    numbered = _lines(spec, errors, label)
    starts: list[int] = []

    def text() -> Iterator[str]:
        for lineno, line in numbered:
            starts.append(lineno)
            yield line + "\n"

    reader = csv.reader(text(), delimiter=delimiter, quoting=_quoting(delimiter), strict=True)
    header: list[str] | None = None
    consumed = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataFormatError(
                f"{label} {spec}:{starts[consumed]}: malformed CSV ({exc})"
            ) from None
        lineno, consumed = starts[consumed], reader.line_num
        where = f"{label} {spec}:{lineno}"
        if not row or (len(row) == 1 and not row[0].strip()):
            yield lineno, {}
        elif header is None:
            header = [name.strip() for name in row]
            _check_names(header, where, "column")
        elif len(row) != len(header):
            hint = (
                "quote fields that hold a comma"
                if delimiter == ","
                else "a field cannot hold a tab"
            )
            raise DataFormatError(
                f"{where}: {len(row)} fields, but the header has {len(header)} "
                f"({', '.join(header)}); {hint}"
            )
        else:
            yield lineno, dict(zip(header, row, strict=True))


def _jsonl_rows(spec: str, errors: str, label: str) -> Iterator[tuple[int, dict]]:
    for lineno, line in _lines(spec, errors, label):
        where = f"{label} {spec}:{lineno}"
        if not line.strip():
            yield lineno, {}
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(record, dict):
            raise DataFormatError(
                f"{where}: expected a JSON object with {EXPECTED}, got {type(record).__name__}"
            )
        _check_names(list(record), where, "key")
        yield lineno, record


def load_triplets(spec: str, errors: str = "strict", label: str = "train_file") -> TripletFile:
    """Read and check every row of a supervised train_file before training starts."""
    delimiter = DELIMITERS.get(_suffix(spec), "")
    if delimiter == "":
        raise DataFormatError(
            f"{label} {spec}: supervised data must be a .csv, .tsv or .jsonl file"
        )
    rows = (
        _jsonl_rows(spec, errors, label)
        if delimiter is None
        else _csv_rows(spec, errors, label, delimiter)
    )
    triplets: list[Triplet] = []
    blank, hard = 0, None
    for lineno, fields in rows:
        if not fields:
            blank += 1
            continue
        triplets.append(_triplet(fields, f"{label} {spec}:{lineno}", hard))
        hard = triplets[-1].hard_neg is not None
    if not triplets:
        raise DataFormatError(f"{label} {spec}: no rows of {EXPECTED} (the file is empty)")
    return TripletFile(triplets, bool(hard), blank, str(spec))

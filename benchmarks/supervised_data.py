"""Supervised SimCSE triplets (sent0, sent1, hard_neg) from the TRAIN splits of SICK and STS-B.

No NLI corpus (SNLI/MNLI, SimCSE's supervised data) is on the package registries, so the
supervised objective is tested and benchmarked on what the shared STS data holds with
labels, train splits only (dev/trial select steps, test scores models; neither is read):

  SICK_train.txt   pairs judged ENTAILMENT are positives (sentence_A -> sentence_B, the
                   judgement's direction); the hard negative is a sentence judged a
                   CONTRADICTION of either (contradiction is symmetric, and whatever
                   contradicts B, which A entails, contradicts A) when SICK has one
  sts-train.csv    pairs scored >= 4.0 (of 5) are positives; the hard negative is a
                   partner scored <= 1.5 of the same first sentence (in either column) when
                   STS-B has one

A file's hard_neg is all-or-nothing (every batch has one shape), so a row without a real
hard negative gets a random sentence of the same source (seeded): a plain extra negative,
no harder than the in-batch ones. The counts of real and random hard negatives are printed.
`--no-hard-neg` writes sent0,sent1 only.

Run: python -m benchmarks.supervised_data --data ../shared/data/sts --out triplets.csv
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections import defaultdict
from pathlib import Path

from diffcse_runtime import sts
from diffcse_runtime.errors import DiffcseError

SICK_HEADER = ["pair_ID", "sentence_A", "sentence_B", "relatedness_score", "entailment_judgment"]
STSB_POSITIVE, STSB_NEGATIVE = 4.0, 1.5
Row = tuple[str, str, str | None]  # sent0, sent1, a real hard negative or None


def _train_file(data: Path, task: str) -> Path:
    """The train split's file of `task` in the SentEval layout (the runtime's registry)."""
    spec = sts.REGISTRY[task]
    folder = sts.find_task_dir(data, spec.folder)
    if folder is None:
        raise DiffcseError(f"{data}: no {spec.folder} folder")
    return folder / spec.files["train"]


def sick_rows(data: Path) -> list[Row]:
    """ENTAILMENT pairs, each with a CONTRADICTION hypothesis of its premise if one exists."""
    path = _train_file(data, "SICKRelatedness")
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines[0].split("\t") != SICK_HEADER:
        raise DiffcseError(f"{path}:1: expected the header {' '.join(SICK_HEADER)}")
    entailed: list[tuple[str, str]] = []
    contradicts: dict[str, set[str]] = defaultdict(set)
    for lineno, line in enumerate(lines[1:], start=2):
        cols = line.split("\t")
        if len(cols) != len(SICK_HEADER):
            raise DiffcseError(f"{path}:{lineno}: expected {len(SICK_HEADER)} columns")
        if cols[4] == "ENTAILMENT":
            entailed.append((cols[1], cols[2]))
        elif cols[4] == "CONTRADICTION":
            contradicts[cols[1]].add(cols[2])
            contradicts[cols[2]].add(cols[1])
    rows: list[Row] = []
    for premise, hypothesis in entailed:
        negatives = sorted((contradicts[premise] | contradicts[hypothesis]) - {premise, hypothesis})
        rows.append((premise, hypothesis, negatives[0] if negatives else None))
    return rows


def stsb_rows(data: Path) -> list[Row]:
    """Pairs scored >= 4, each with a partner scored <= 1.5 of the same sentence if one exists."""
    pairs = sts.load_task(data, "STSBenchmark", split="train")
    low: dict[str, list[str]] = defaultdict(list)
    for a, b, gold in zip(pairs.sents1, pairs.sents2, pairs.gold, strict=True):
        if gold <= STSB_NEGATIVE:  # a score is symmetric
            low[a].append(b)
            low[b].append(a)
    return [
        (a, b, (low.get(a) or [None])[0])
        for a, b, gold in zip(pairs.sents1, pairs.sents2, pairs.gold, strict=True)
        if gold >= STSB_POSITIVE
    ]


def fill_negatives(rows: list[Row], seed: int) -> tuple[list[tuple[str, str, str]], int]:
    """Every row gets a hard_neg: its real one, else a random other sentence of the source."""
    rng = random.Random(seed)
    pool = sorted({s for row in rows for s in row[:2]})
    out, real = [], 0
    for sent0, sent1, neg in rows:
        if neg is not None:
            real += 1
        while neg is None or neg in (sent0, sent1):
            neg = rng.choice(pool)
        out.append((sent0, sent1, neg))
    return out, real


def build(data: Path, out: Path, seed: int = 42, hard_neg: bool = True) -> dict[str, int]:
    """Write the triplet CSV (rows shuffled with `seed`); returns the counts printed."""
    counts: dict[str, int] = {}
    triplets: list[tuple[str, ...]] = []
    for name, rows in (("sick", sick_rows(data)), ("stsb", stsb_rows(data))):
        filled, real = fill_negatives(rows, seed)
        counts[f"{name}_rows"], counts[f"{name}_real_hard_neg"] = len(rows), real
        triplets += filled if hard_neg else [row[:2] for row in filled]
    random.Random(seed).shuffle(triplets)
    counts["rows"] = len(triplets)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sent0", "sent1", "hard_neg"] if hard_neg else ["sent0", "sent1"])
        writer.writerows(triplets)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sts"))
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-hard-neg", action="store_true", help="write sent0,sent1 only")
    args = parser.parse_args(argv)
    try:
        counts = build(args.data, args.out, args.seed, not args.no_hard_neg)
    except (DiffcseError, OSError) as exc:
        print(f"supervised_data: {exc}", file=sys.stderr)
        return 1
    for key, value in counts.items():
        print(f"{key:>20}: {value}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

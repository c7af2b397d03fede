"""STS evaluation in the SentEval layout, the protocol of the SimCSE and DiffCSE papers.

This module is the one place where STS data is read and scored: training evaluates its
PyTorch encoder through `evaluate`, export validates ONNX models through it, and
`diffcse-eval` prints its table. Any `encode(list[str]) -> array (n, d)` callable works.

Score = Spearman x 100 of the cosine similarity against the gold score. STS12-16 report
the "all" setting (one correlation over all subsets concatenated) as SimCSE/DiffCSE do,
and also "wmean" (per-subset correlations averaged, weighted by subset size).

Where the data lives: `data_dir` is SentEval's `data/downstream` folder or any folder that
holds the task folders directly or under `STS/`:
    STS12-en-test .. STS16-en-test   STS.input.<subset>.txt + STS.gs.<subset>.txt
    STSBenchmark                      sts-{train,dev,test}.csv (tab-separated)
    SICK                              SICK_train.txt, SICK_trial.txt, SICK_test_annotated.txt
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffcse_runtime.errors import DataFormatError, DiffcseError

EncodeFn = Callable[[list[str]], np.ndarray]

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class TaskSpec:
    """Where SentEval keeps one task and which splits it has. `REGISTRY` is the one copy of
    these facts: training, export and the benchmarks ask `available_tasks` or
    `tasks_with_split` rather than naming folders and files themselves."""

    folder: str  # the task folder, directly under the data dir or under STS/
    files: dict[str, str] = field(default_factory=dict)  # split -> its pairs file
    subsets: tuple[str, ...] = ()  # STS12-16: test only, one input/gold file pair per subset
    short: str = ""  # the table's column head, when shorter than the name

    @property
    def splits(self) -> tuple[str, ...]:
        return ("test",) if self.subsets else tuple(self.files)

    def has_split(self, task_dir: Path, split: str) -> bool:
        """Presence only (folder and file), not validity: loading checks that."""
        if self.subsets:
            return split == "test"
        return split in self.files and (task_dir / self.files[split]).is_file()


# The subsets SentEval evaluates for each year (STS13 has no SMT: it is not distributed).
REGISTRY: dict[str, TaskSpec] = {
    "STS12": TaskSpec(
        "STS12-en-test",
        subsets=("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    ),
    "STS13": TaskSpec("STS13-en-test", subsets=("FNWN", "headlines", "OnWN")),
    "STS14": TaskSpec(
        "STS14-en-test",
        subsets=("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    ),
    "STS15": TaskSpec(
        "STS15-en-test",
        subsets=("answers-forums", "answers-students", "belief", "headlines", "images"),
    ),
    "STS16": TaskSpec(
        "STS16-en-test",
        subsets=("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
    ),
    "STSBenchmark": TaskSpec(
        "STSBenchmark", files={s: f"sts-{s}.csv" for s in SPLITS}, short="STS-B"
    ),
    "SICKRelatedness": TaskSpec(
        "SICK",
        files={
            "train": "SICK_train.txt",
            "dev": "SICK_trial.txt",
            "test": "SICK_test_annotated.txt",
        },
        short="SICK-R",
    ),
}
TASKS = list(REGISTRY)
ALIASES = {
    "STSB": "STSBenchmark",
    "STS-B": "STSBenchmark",
    "SICK-R": "SICKRelatedness",
    "SICKR": "SICKRelatedness",
    "SICK": "SICKRelatedness",
}
AUTO_ORDER = ("test", "dev")  # --split auto: the held-out split the data has, test first
WHERE_DATA = (
    "SentEval-layout data comes from SentEval's data/downstream/get_transfer_data.bash "
    "(github.com/facebookresearch/SentEval): STS12-16 and SICK with test sets, STSBenchmark "
    "with sts-train/dev/test.csv"
)


@dataclass
class PairSet:
    """Sentence pairs with gold scores; `subset` names each pair's subset (STS12-16)."""

    sents1: list[str]
    sents2: list[str]
    gold: np.ndarray
    subset: list[str] = field(default_factory=list)
    source: str = ""  # the file (or, for STS12-16, the folder) the pairs came from
    subset_files: dict[str, str] = field(default_factory=dict)  # subset -> its gold file

    def __len__(self) -> int:
        return len(self.gold)


@dataclass
class TaskScore:
    task: str
    spearman: float  # x100, "all" setting for STS12-16
    n_pairs: int
    wmean: float | None = None  # x100, STS12-16 only
    subsets: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    scores: dict[str, TaskScore]
    split: str

    @property
    def average(self) -> float:
        """Mean Spearman over the tasks evaluated (the paper's "Avg." when all 7 are present)."""
        return float(np.mean([s.spearman for s in self.scores.values()]))

    def to_json(self) -> dict:
        return {
            "split": self.split,
            "average": self.average,
            "complete": set(self.scores) == set(TASKS),
            "tasks": {name: vars(score) for name, score in self.scores.items()},
        }


# ---------------------------------------------------------------- Spearman


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties given the average of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    starts_new = np.concatenate([[True], sorted_vals[1:] != sorted_vals[:-1]])
    group = np.cumsum(starts_new) - 1  # group index of each sorted position
    bounds = np.concatenate([np.flatnonzero(starts_new), [len(values)]])
    avg_rank = (bounds[:-1] + bounds[1:] + 1) / 2.0  # mean of 1-based ranks first..last
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = avg_rank[group]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho with tie-aware ranks; NaN when either side is constant."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of equal length, got {x.shape}, {y.shape}")
    rx, ry = rankdata(x) - (len(x) + 1) / 2.0, rankdata(y) - (len(y) + 1) / 2.0
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of `a` with row i of `b`, in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------- loaders


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not valid UTF-8") from None


def _score(text: str, path: Path, lineno: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(f"{path}:{lineno}: gold score {text!r} is not a number") from None
    if not np.isfinite(value):
        raise DataFormatError(f"{path}:{lineno}: gold score {text!r} is not a finite number")
    return value


def _columns(line: str, path: Path, lineno: int, need: int) -> list[str]:
    cols = line.split("\t")
    if len(cols) < need:
        raise DataFormatError(
            f"{path}:{lineno}: expected at least {need} tab-separated columns, found {len(cols)}"
        )
    return cols


def find_task_dir(data_dir: str | Path, folder: str) -> Path | None:
    """Locate a task folder directly under `data_dir` or under `data_dir/STS`."""
    data_dir = Path(data_dir)
    for candidate in (data_dir / folder, data_dir / "STS" / folder, data_dir):
        if candidate.name == folder and candidate.is_dir():
            return candidate
    return None


def load_sts_year(task_dir: Path, subsets: Sequence[str]) -> PairSet:
    """STS12-16: tab-separated sentence pairs and a gold file; blank gold lines dropped."""
    out = PairSet([], [], np.zeros(0), [], source=str(task_dir))
    gold_all: list[float] = []
    for subset in subsets:
        inp, gs = task_dir / f"STS.input.{subset}.txt", task_dir / f"STS.gs.{subset}.txt"
        out.subset_files[subset] = str(gs)
        pairs, golds = _read_lines(inp), _read_lines(gs)
        if len(pairs) != len(golds):
            raise DataFormatError(
                f"{gs}: {len(golds)} gold lines but {inp.name} has {len(pairs)} pairs"
            )
        for lineno, (pair, gold) in enumerate(zip(pairs, golds, strict=True), start=1):
            if not gold.strip():
                continue
            cols = _columns(pair, inp, lineno, 2)
            out.sents1.append(cols[0])
            out.sents2.append(cols[1])
            gold_all.append(_score(gold.strip(), gs, lineno))
            out.subset.append(subset)
    out.gold = np.asarray(gold_all, dtype=np.float64)
    return out


def load_stsb(path: Path) -> PairSet:
    """STS Benchmark csv: score in column 4, sentences in columns 5 and 6 (0-based)."""
    s1, s2, gold = [], [], []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        cols = _columns(line, path, lineno, 7)
        gold.append(_score(cols[4], path, lineno))
        s1.append(cols[5])
        s2.append(cols[6])
    return PairSet(s1, s2, np.asarray(gold, dtype=np.float64), source=str(path))


def load_sick(path: Path) -> PairSet:
    """SICK: a header line, then pair_ID, sentence_A, sentence_B, relatedness_score, ..."""
    s1, s2, gold = [], [], []
    lines = _read_lines(path)
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = _columns(line, path, lineno, 4)
        s1.append(cols[1])
        s2.append(cols[2])
        gold.append(_score(cols[3], path, lineno))
    return PairSet(s1, s2, np.asarray(gold, dtype=np.float64), source=str(path))


def canonical_task(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise DiffcseError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return name


def tasks_with_split(split: str) -> list[str]:
    """The tasks that have `split` at all (STS12-16 are test-only), whatever is on disk."""
    return [task for task, spec in REGISTRY.items() if split in spec.splits]


def load_task(data_dir: str | Path, task: str, split: str = "test") -> PairSet:
    """Load one task's pairs. STS12-16 only have a test split."""
    task = canonical_task(task)
    if split not in SPLITS:
        raise DiffcseError(f"unknown split {split!r}; choose train, dev or test")
    spec = REGISTRY[task]
    task_dir = find_task_dir(data_dir, spec.folder)
    if task_dir is None:
        raise DataFormatError(f"{data_dir}: no {spec.folder} folder for task {task}")
    if spec.subsets:
        if split != "test":
            raise DiffcseError(f"{task} has only a test split")
        return load_sts_year(task_dir, spec.subsets)
    path = task_dir / spec.files[split]
    return load_stsb(path) if task == "STSBenchmark" else load_sick(path)


def available_tasks(data_dir: str | Path, split: str = "test") -> list[str]:
    """The tasks whose data for `split` is present under `data_dir`.

    Presence only: a task that is present but malformed is then loaded by `evaluate` and
    fails there naming FILE:LINE, instead of being dropped from the average silently.
    """
    found = []
    for task, spec in REGISTRY.items():
        task_dir = find_task_dir(data_dir, spec.folder)
        if task_dir is not None and spec.has_split(task_dir, split):
            found.append(task)
    return found


# ---------------------------------------------------------------- scoring


def _check_defined(gold: np.ndarray, where: str) -> None:
    """Spearman needs 2 pairs and gold scores that vary: an empty or constant file would
    score NaN, which used to be printed as "nan", averaged in and written into the JSON."""
    if len(gold) < 2:
        n = f"{len(gold)} pair" + ("" if len(gold) == 1 else "s")
        raise DataFormatError(f"{where}: {n}, at least 2 are needed for a Spearman correlation")
    if np.all(gold == gold[0]):
        raise DataFormatError(
            f"{where}: every gold score is {gold[0]:g}; a correlation with constant scores "
            "is undefined"
        )


def _check_scores(pairs: PairSet) -> None:
    """Each subset's gold file, then the whole task, must define a correlation."""
    names = np.asarray(pairs.subset)
    for name, gs in pairs.subset_files.items():
        _check_defined(pairs.gold[names == name] if len(names) else pairs.gold[:0], gs)
    _check_defined(pairs.gold, pairs.source or "the pairs")


def _correlation(sims: np.ndarray, gold: np.ndarray, task: str, where: str) -> float:
    if np.all(sims == sims[0]):
        raise DiffcseError(
            f"{task or 'STS'}: the model gave the same similarity to every pair of {where}; "
            "a correlation is undefined (is the model's output constant?)"
        )
    return 100 * spearman(sims, gold)


def score_pairs(encode: EncodeFn, pairs: PairSet, task: str = "") -> TaskScore:
    """Encode each distinct sentence once, then score cosine against gold."""
    _check_scores(pairs)
    vocab = list(dict.fromkeys(pairs.sents1 + pairs.sents2))
    index = {s: i for i, s in enumerate(vocab)}
    emb = np.asarray(encode(vocab), dtype=np.float32)
    if emb.shape[0] != len(vocab):
        raise DiffcseError(f"encode returned {emb.shape[0]} rows for {len(vocab)} sentences")
    if not np.isfinite(emb).all():
        raise DiffcseError(f"{task or 'STS'}: the model returned NaN or infinite embeddings")
    sims = cosine_rows(emb[[index[s] for s in pairs.sents1]], emb[[index[s] for s in pairs.sents2]])
    where = pairs.source or "the pairs"
    result = TaskScore(task, _correlation(sims, pairs.gold, task, where), len(pairs))
    if pairs.subset:
        names = np.asarray(pairs.subset)
        for name in dict.fromkeys(pairs.subset):
            sel = names == name
            gs = pairs.subset_files.get(name, name)
            result.subsets[name] = _correlation(sims[sel], pairs.gold[sel], task, gs)
        sizes = np.array([np.sum(names == n) for n in result.subsets])
        result.wmean = float(np.dot(list(result.subsets.values()), sizes) / sizes.sum())
    return result


def found_splits(data_dir: str | Path, tasks: Sequence[str] | None = None) -> dict[str, list]:
    """{split: tasks whose data for it is present}, for the splits that have any."""
    found = {}
    for split in SPLITS:
        present = [t for t in available_tasks(data_dir, split) if not tasks or t in tasks]
        if present:
            found[split] = present
    return found


def _no_data(data_dir: str | Path, split: str, tasks: Sequence[str] | None) -> DataFormatError:
    found = found_splits(data_dir, tasks)
    listed = "; ".join(f"{s} ({', '.join(ts)})" for s, ts in found.items()) or "nothing"
    other = [s for s in (*AUTO_ORDER, "train") if s in found and s != split]
    hint = f"pass --split {other[0]}, or get" if other else "get"
    return DataFormatError(
        f"{data_dir}: no STS task data found for split {split!r} (found: {listed}); {hint} "
        f"the data: {WHERE_DATA}"
    )


def resolve_split(data_dir: str | Path, tasks: Sequence[str] | None, split: str) -> str:
    """`split` itself, or for "auto" the first of test, dev that the data has (for `tasks`,
    or for any task when None): held-out data, never train, chosen the same way each run."""
    if split != "auto":
        return split
    wanted = [canonical_task(t) for t in tasks] if tasks else None
    found = found_splits(data_dir, wanted)
    for candidate in AUTO_ORDER:
        if candidate in found:
            return candidate
    raise _no_data(data_dir, "auto", wanted)


def evaluate(
    encode: EncodeFn,
    data_dir: str | Path,
    tasks: Sequence[str] | None = None,
    split: str = "test",
) -> EvalResult:
    """Score `encode` on `tasks` (default: every task whose data is present) on `split`
    ("auto": test where the data has it, else dev; the result says which was scored)."""
    split = resolve_split(data_dir, tasks, split)
    names = [canonical_task(t) for t in tasks] if tasks else available_tasks(data_dir, split)
    if not names:
        raise _no_data(data_dir, split, None)
    scores = {t: score_pairs(encode, load_task(data_dir, t, split), t) for t in names}
    return EvalResult(scores, split)


def format_table(result: EvalResult) -> str:
    """Tasks as columns, like Table 1 of the paper."""
    heads = [REGISTRY[t].short or t for t in result.scores] + ["Avg."]
    vals = [f"{s.spearman:.2f}" for s in result.scores.values()] + [f"{result.average:.2f}"]
    widths = [max(len(h), len(v)) for h, v in zip(heads, vals, strict=True)]
    line = lambda cells: " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    rows = [line(heads), "-+-".join("-" * w for w in widths), line(vals)]
    if set(result.scores) != set(TASKS):
        rows.append(f"(split {result.split}; Avg. over {len(result.scores)} of 7 tasks)")
    else:
        rows.append(f"(split {result.split})")
    return "\n".join(rows)

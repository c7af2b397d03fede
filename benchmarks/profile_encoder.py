"""Where diffcse_runtime's encoding time goes, and which onnxruntime settings help.

Part 1, the breakdown: for each model variant, text set and batch size, the time of
`Encoder.encode` split into tokenization (one Rust batch call), `session.run`, and the rest
(padding arrays, reordering, Python), plus the padding waste: padded tokens / real tokens
with the runtime's length-sorted batches versus batches in input order, and the session
time of each.

Part 2, the options: the same encode() with the session rebuilt under each setting
(graph optimization level, intra-op threads, thread spinning, memory arena, IO binding,
per-sentence tokenizer calls), interleaved round-robin; medians and the ratio to the
runtime's current default. Session creation time per optimization level is also shown
(it is part of cold start).

Run: python -m benchmarks.profile_encoder
     python -m benchmarks.profile_encoder --fp32-dir DIR --limit 128 --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks import benchlib
from benchmarks.benchlib import VARIANTS, BenchSkip
from benchmarks.models import given_or_exported
from diffcse_runtime.encoder import OUTPUT_NAME

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class TimedSession:
    """Wraps an InferenceSession so every run() adds its wall time to `seconds`."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session, self.seconds = session, 0.0

    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.session.run(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out

    def __getattr__(self, name):
        return getattr(self.session, name)


class IOBoundSession:
    """run() through IO binding: inputs bound as OrtValues, output fetched as numpy."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session

    def run(self, output_names, feed):
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for name in output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def __getattr__(self, name):
        return getattr(self.session, name)


@functools.cache
def runtime_fusions_off(model: Path) -> tuple[str, ...]:
    """The graph fusions diffcse_runtime.Encoder turns off on CPU for this model's variant
    (read once per model: `session()` is called inside timed loops)."""
    from diffcse_runtime.encoder import CPU_DISABLED_FUSIONS
    from diffcse_runtime.model_dir import load_metadata

    return tuple(CPU_DISABLED_FUSIONS.get(load_metadata(model, verify_hash=False).variant, []))


def session(
    model: Path,
    threads: int,
    level: str = "all",
    spin: bool = True,
    arena: bool = True,
    mem_pattern: bool = True,
    fusions_off: list[str] | None = None,
):
    """A session like the Encoder's (same disabled fusions unless `fusions_off` is given)."""
    off = runtime_fusions_off(model) if fusions_off is None else fusions_off
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[level]
    opts.intra_op_num_threads = threads
    opts.enable_cpu_mem_arena = arena
    opts.enable_mem_pattern = mem_pattern
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(model / "model.onnx"),
        opts,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(off),
    )


# ---------------------------------------------------------------- part 1: breakdown


def padding_stats(encoder, texts: list[str], batch_size: int) -> dict:
    lengths = np.array([len(e.ids) for e in encoder.tokenizer.encode_batch(texts)])
    real = int(lengths.sum())

    def padded(order: np.ndarray) -> int:
        return sum(
            int(lengths[order[s : s + batch_size]].max()) * len(order[s : s + batch_size])
            for s in range(0, len(order), batch_size)
        )

    return {
        "real_tokens": real,
        "pad_ratio_sorted": padded(np.argsort(-lengths, kind="stable")) / real,
        "pad_ratio_input_order": padded(np.arange(len(texts))) / real,
    }


def run_unsorted(encoder, texts: list[str], batch_size: int) -> None:
    """The runtime's batches without length sorting (for the padding-waste time)."""
    enc = encoder.tokenizer.encode_batch(texts)
    for s in range(0, len(texts), batch_size):
        ids = [e.ids for e in enc[s : s + batch_size]]
        encoder._run_batch(ids, np.array([len(i) for i in ids]))  # (ids, lengths)


def breakdown(encoder, texts: list[str], batch_size: int, repeats: int) -> dict:
    timed = TimedSession(encoder.session)
    encoder.session = timed
    tok, run, total, unsorted_run = [], [], [], []
    try:
        encoder.encode(texts[: 2 * batch_size], batch_size=batch_size)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoder.tokenizer.encode_batch(texts, add_special_tokens=True)
            tok.append(time.perf_counter() - t0)
            timed.seconds = 0.0
            t0 = time.perf_counter()
            encoder.encode(texts, batch_size=batch_size)
            total.append(time.perf_counter() - t0)
            run.append(timed.seconds)
            timed.seconds = 0.0
            run_unsorted(encoder, texts, batch_size)
            unsorted_run.append(timed.seconds)
    finally:
        encoder.session = timed.session
    t, r, a = benchlib.median(tok), benchlib.median(run), benchlib.median(total)
    return {
        "total_s": a,
        "tokenize_s": t,
        "session_run_s": r,
        "other_s": max(a - t - r, 0.0),
        "tokenize_%": 100 * t / a,
        "session_run_%": 100 * r / a,
        "other_%": 100 * max(a - t - r, 0.0) / a,
        "session_run_unsorted_s": benchlib.median(unsorted_run),
        **padding_stats(encoder, texts, batch_size),
    }


# ---------------------------------------------------------------- part 2: options


def option_variants(model: Path, threads: int) -> dict[str, object]:
    """name -> session object to swap into the Encoder; 'default' is what Encoder builds."""
    cores = len(os.sched_getaffinity(0))
    out = {
        "default": None,
        "level=disable": session(model, threads, "disable"),
        "level=basic": session(model, threads, "basic"),
        "level=extended": session(model, threads, "extended"),
        "no spinning": session(model, threads, spin=False),
        "no mem arena": session(model, threads, arena=False),
        "no mem pattern": session(model, threads, mem_pattern=False),
        "io binding": IOBoundSession(session(model, threads)),
    }
    sln = ["SkipLayerNormFusion"]
    if list(runtime_fusions_off(model)) == sln:  # int8: what the runtime's choice is worth
        out["SkipLayerNorm fusion on"] = session(model, threads, fusions_off=[])
    else:
        out["SkipLayerNorm fusion off"] = session(model, threads, fusions_off=sln)
    if cores > 1:
        other = 1 if threads > 1 else cores
        out[f"intra_op={other}"] = session(model, other)
    return out


def per_sentence(encoder, texts: list[str], batch_size: int) -> None:
    """The same pipeline but one tokenizer call per sentence (what batch tokenization saves)."""
    enc = [encoder.tokenizer.encode(t) for t in texts]
    lengths = np.array([len(e.ids) for e in enc])
    order = np.argsort(-lengths, kind="stable")
    for s in range(0, len(texts), batch_size):
        rows = order[s : s + batch_size]
        encoder._run_batch([enc[i].ids for i in rows], lengths[rows])


def bucketed(encoder, texts: list[str], batch_size: int, multiple: int = 8) -> None:
    """Sorted batches padded up to a multiple of 8: fewer distinct shapes, more padding."""
    enc = encoder.tokenizer.encode_batch(texts)
    lengths = np.array([len(e.ids) for e in enc])
    order = np.argsort(-lengths, kind="stable")
    for s in range(0, len(texts), batch_size):
        rows = order[s : s + batch_size]
        width = -(-int(lengths[rows[0]]) // multiple) * multiple
        run_padded(encoder, [enc[i].ids for i in rows], lengths[rows], width)


def run_padded(encoder, ids: list[list[int]], lengths: np.ndarray, width: int) -> np.ndarray:
    """One session run padded to `width`, wider than the runtime's own batches (which pad to
    their longest text, Encoder._run_batch): the feed is built here the same way."""
    mask = np.arange(width) < lengths[:, None]
    input_ids = np.full((len(ids), width), encoder.meta.pad_token_id, dtype=np.int64)
    input_ids[mask] = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])
    feed = {"input_ids": input_ids, "attention_mask": mask.astype(np.int64)}
    if "token_type_ids" in {i.name for i in encoder.session.get_inputs()}:
        feed["token_type_ids"] = np.zeros_like(input_ids)
    return encoder.session.run([OUTPUT_NAME], feed)[0]


def compare_options(encoder, model, texts, batch_size, threads, repeats) -> dict[str, float]:
    variants = option_variants(model, threads)
    default = encoder.session
    names = list(variants) + ["per-sentence tokenize", "pad widths to x8"]
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for rep in range(repeats + 1):  # round 0 is a warm-up
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                sess = variants.get(name)
                encoder.session = default if sess is None else sess
                t0 = time.perf_counter()
                if name == "per-sentence tokenize":
                    per_sentence(encoder, texts, batch_size)
                elif name == "pad widths to x8":
                    bucketed(encoder, texts, batch_size)
                else:
                    encoder.encode(texts, batch_size=batch_size)
                if rep:
                    times[name].append(time.perf_counter() - t0)
    finally:
        encoder.session = default
    return {n: benchlib.median(t) for n, t in times.items()}


def session_create_times(model: Path, threads: int, repeats: int = 3) -> dict[str, float]:
    runtime_fusions_off(model)  # the metadata read stays out of the timed region
    out = {}
    for level in LEVELS:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session(model, threads, level)
            ts.append(time.perf_counter() - t0)
        out[level] = benchlib.median(ts)
    return out


def arguments() -> argparse.Namespace:
    p = benchlib.parser(
        "profile_encoder", __doc__, "data", "threads", "rounds", "variant-dirs", rounds=5
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="from " + ",".join(VARIANTS))
    p.add_argument("--batch-sizes", type=benchlib.positive_ints, default=[1, 32, 128])
    p.add_argument(
        "--option-batch-sizes",
        type=benchlib.positive_ints,
        default=[32],
        help="batch sizes of part 2 (the options)",
    )
    p.add_argument("--limit", type=benchlib.positive_int, default=256, help="texts per set")
    args = p.parse_args()
    args.variants = args.variants.split(",")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    return args


def text_sets(data: Path, limit: int) -> dict[str, list[str]]:
    """`limit` random STS-B dev sentences, and as many ~128-token texts made of them."""
    dev = benchlib.stsb_dev_sentences(data)
    rng = np.random.default_rng(0)
    return {
        "short": [dev[i] for i in sorted(rng.permutation(len(dev))[:limit])],
        "long": benchlib.long_texts(dev, benchlib.minilm_dir() / "tokenizer.json")[:limit],
    }


def profile_variant(model: Path, variant: str, sets, args, result: dict) -> None:
    """Part 1 for every set and batch size, part 2 where the batch size is asked for."""
    from diffcse_runtime import Encoder

    encoder = Encoder(model, intra_op_threads=args.threads)
    result["create_s"][variant] = session_create_times(model, args.threads)
    for set_name, texts in sets.items():
        for bs in args.batch_sizes:
            row = {"variant": variant, "texts": set_name, "batch": bs}
            result["breakdown"].append(row | breakdown(encoder, texts, bs, args.rounds))
            print(f"  {variant} {set_name} bs={bs}: breakdown done", flush=True)
            if bs not in args.option_batch_sizes:
                continue
            opts = compare_options(encoder, model, texts, bs, args.threads, args.rounds)
            base = opts["default"]
            result["options"] += [
                row | {"option": n, "median_s": t, "x default": base / t} for n, t in opts.items()
            ]


def report(result: dict) -> None:
    cols = ["variant", "texts", "batch", "total_s", "tokenize_%", "session_run_%", "other_%"]
    cols += ["pad_ratio_sorted", "pad_ratio_input_order", "session_run_unsorted_s"]
    print(benchlib.table(result["breakdown"], cols, 3))
    print()
    print(benchlib.table(result["options"], ["variant", "texts", "batch", "option", "x default"]))
    print()
    rows = [{"variant": v, **t} for v, t in result["create_s"].items()]
    print("session creation seconds by graph optimization level:")
    print(benchlib.table(rows, ["variant", *LEVELS], 3))


def main() -> None:
    args = arguments()
    if benchlib.devices(args.device) != ["cpu"]:
        print("# the profile is CPU-only: the session options compared are CPU ones")
    sets = text_sets(benchlib.sts_data_dir(args.data), args.limit)
    info = benchlib.machine(args.threads)
    print(benchlib.describe(info))
    result = {"benchmark": "profile_encoder", "breakdown": [], "options": [], "create_s": {}}
    unavailable = {}
    for variant in args.variants:
        try:
            model = given_or_exported(getattr(args, f"{variant}_dir"), variant)
        except BenchSkip as exc:
            unavailable[variant] = str(exc)
            print(f"  {variant}: unavailable, {exc}")
            continue
        profile_variant(model, variant, sets, args, result)
    if not result["breakdown"]:
        raise BenchSkip(f"no model variant available: {unavailable}")
    result["unavailable"] = unavailable
    result["machine"] = benchlib.finish_machine(info)
    report(result)
    print(f"wrote {benchlib.write_json(args.out, result)}")


if __name__ == "__main__":
    benchlib.run_main(main)

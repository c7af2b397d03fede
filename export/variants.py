"""Graphs derived from the fp32 export: fused (`optimized`), dynamic `int8`, and `fp16`.

optimized  onnxruntime.transformers.optimizer alone finds SkipLayerNormalization and
           BiasGelu in a torch.export graph but no Attention: its attention patterns are
           those of the legacy TorchScript exporter. onnxscript's ORT fusions recognise the
           torch.export attention subgraph (SDPA -> MultiHeadAttention -> Attention), so
           they run first and the onnxruntime optimizer runs after them for anything left.
int8       onnxruntime dynamic quantization of the encoder's MatMul weights in the fp32
           graph, int8 per output channel (per-tensor scales cost more STS accuracy on
           MiniLM); activations are quantized at run time, embeddings and LayerNorms stay
           fp32. A folded projector stays fp32: its BatchNorm-scaled weights and per-tensor
           activation quantization after the ReLU turned a cosine of 0.9999 into 0.84 on a
           trained tiny model, and it is a few percent of the compute.
fp16       the optimized graph converted to float16 with float32 inputs/outputs kept, for
           GPUs; onnxruntime's CPU provider runs it too, which is what validates it here.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

VARIANTS = ("fp32", "optimized", "int8", "fp16")
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The optimizer and quantizer log advice at INFO/WARNING on the root logger; mute it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each op type the main graph of an ONNX file holds."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def fused_op_counts(path: str | Path) -> dict[str, int]:
    """The fused transformer ops (Attention, SkipLayerNormalization, ...) in a graph."""
    counts = op_counts(path)
    return {op: counts[op] for op in FUSED_OPS if counts.get(op)}


def optimize(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse attention, LayerNorm and GELU; return the fused-op counts of the result."""
    import onnx_ir as ir
    from onnxruntime.transformers import optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    fused = dst.with_name(f".{dst.stem}.fused.onnx")
    try:
        with _quiet():
            model, _ = optimize_for_ort(ir.load(str(src)))
            ir.save(model, str(fused))
            result = optimizer.optimize_model(
                str(fused), model_type="bert", num_heads=num_heads, hidden_size=hidden_size
            )
            result.save_model_to_file(str(dst))
    finally:
        fused.unlink(missing_ok=True)
    return fused_op_counts(dst)


def quantize_int8(src: Path, dst: Path, exclude: list[str] | None = None) -> None:
    """Dynamic int8 quantization of MatMul weights, per output channel; `exclude` stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=exclude or [],
        )


def to_fp16(src: Path, dst: Path) -> None:
    """Convert weights and compute to float16; inputs and the output stay int64/float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dst))

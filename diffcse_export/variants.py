"""Graphs derived from the fp32 export: fused (`optimized`), static `int8`, and `fp16`.

optimized  onnxruntime.transformers.optimizer alone finds SkipLayerNormalization and
           BiasGelu in a torch.export graph but no Attention: its attention patterns are
           those of the legacy TorchScript exporter. onnxscript's ORT fusions recognise the
           torch.export attention subgraph (SDPA -> MultiHeadAttention -> Attention), so
           they run first and the onnxruntime optimizer runs after them for anything left.
int8       onnxruntime static quantization (QDQ) of the encoder's weight MatMuls: int8
           weights per output channel, uint8 activations with scales fixed at export from
           calibration text (`diffcse_export.calibration`), so a text's vector does not
           depend on its batch neighbours (dynamic quantization took one scale per padded
           batch). Embeddings, LayerNorms, attention and a folded projector stay fp32: its
           BatchNorm-scaled weights and quantized activations after the ReLU turned a
           cosine of 0.9999 into 0.84 on a trained tiny model, and it is a few percent of
           the compute. Before quantizing, the outlier channels of LayerNorm outputs are
           moved into the weights that read them (`smooth_layernorm_inputs`).
fp16       the optimized graph converted to float16 with float32 inputs/outputs kept, for
           GPUs; onnxruntime's CPU provider runs it too, which is what validates it here.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diffcse_export.calibration import calibration_feeds

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


SMOOTH_ALPHA = 0.5  # s = max|x|^a / max|w|^(1-a): half of each channel's range moves


@dataclass(frozen=True)
class Int8Recipe:
    """How `quantize_int8` quantizes; the defaults are the shipped recipe (see its table)."""

    method: str = "minmax"  # minmax | percentile | entropy (onnxruntime calibrators)
    percentile: float = 99.999
    activations: str = "uint8"  # uint8 asymmetric | int8 symmetric
    smooth: bool = True  # smooth_layernorm_inputs first
    attention: bool = False  # also Q.K^T and softmax.V (both inputs activations)


def smooth_layernorm_inputs(
    src: Path, dst: Path, feeds: list[dict], exclude: list[str] | None = None
) -> int:
    """Rescale the channels of every LayerNorm output read by weight MatMuls; return how many.

    For each LayerNormalization output x that feeds MatMuls with a constant 2-D weight
    (in BERT-family layers: query/key/value, and the FFN up-projection), a per-channel
    s = max|x|^a / max|W row|^(1-a) (a = SMOOTH_ALPHA, max|x| over the calibration `feeds`,
    max|W row| over all readers, geometric mean 1) gives x' = x / s, a new Mul node, and
    W' = diag(s) W for each reader, so x' W' = x W in exact arithmetic: the fp32 graph
    computes the same function (SmoothQuant, Xiao et al. 2022).
    The LayerNorm output itself is untouched: it is also the residual stream.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    ln_outputs = {n.output[0] for n in graph.node if n.op_type == "LayerNormalization"}
    skip = set(exclude or [])
    readers: dict[str, list] = {}
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or node.name in skip:
            continue
        if node.input[0] in ln_outputs:
            readers.setdefault(node.input[0], []).append(node)
    if readers:
        taps = onnx.ModelProto()  # a copy that outputs the LayerNorms, not a second load
        taps.CopyFrom(model)
        taps.graph.ClearField("output")
        taps.graph.output.extend(helper.make_empty_tensor_value_info(x) for x in readers)
        session = ort.InferenceSession(taps.SerializeToString(), providers=["CPUExecutionProvider"])
        amax = {x: 0.0 for x in readers}
        for feed in feeds:
            for x, value in zip(readers, session.run(list(readers), feed), strict=True):
                amax[x] = np.maximum(amax[x], np.abs(value.reshape(-1, value.shape[-1])).max(0))
    for x, nodes in readers.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        wmax = np.max([np.abs(w).max(1) for w in weights], axis=0)
        scale = np.maximum(amax[x], 1e-5) ** SMOOTH_ALPHA
        scale = scale / np.maximum(wmax, 1e-5) ** (1 - SMOOTH_ALPHA)
        scale = (scale / np.exp(np.mean(np.log(scale)))).astype(np.float32)
        inverse = numpy_helper.from_array((1 / scale).astype(np.float32), f"{x}_smooth_inv")
        graph.initializer.append(inverse)
        mul = helper.make_node("Mul", [x, inverse.name], [f"{x}_smoothed"], name=f"{x}_smooth")
        for node, w in zip(nodes, weights, strict=True):
            scaled = (w * scale[:, None]).astype(np.float32)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(scaled, node.input[1]))
            node.input[0] = mul.output[0]
        first = min(i for i, n in enumerate(graph.node) if n.output and mul.output[0] in n.input)
        graph.node.insert(first, mul)
    onnx.save(model, str(dst))
    return len(readers)


def graph_feeds(src: Path, sentences, tokenizer_file: Path, max_len: int) -> list[dict]:
    """`calibration_feeds` for the inputs the graph at `src` declares."""
    import onnx

    names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    return calibration_feeds(sentences, tokenizer_file, names, max_len)


def _activation_matmuls(src: Path) -> list[str]:
    """MatMuls whose both inputs are activations: attention's Q.K^T and softmax.V."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]


def quantize_int8(
    src: Path,
    dst: Path,
    feeds: list[dict],
    exclude: list[str] | None = None,
    recipe: Int8Recipe | None = None,
) -> int:
    """Static int8 (QDQ) of the encoder's MatMuls, scales fixed by calibration `feeds`.

    Returns how many LayerNorm outputs `smooth_layernorm_inputs` rescaled first.

    Why smoothing: BERT-family encoders carry massive activations in a few residual
    channels after LayerNorm (all-MiniLM-L6-v2: channel 99 reaches 21-30 on [CLS] in the
    post-attention LayerNorm, the other tokens stay under 6-10), so one per-tensor scale
    quantizes every other token in steps of ~0.12 against an RMS of ~0.6, and mean pooling
    of a 2-3 token sentence averages just those coarse tokens. Weight quantization alone
    costs little (weights-only int8: min cosine 0.9965); the error adds up over layers,
    most of it from the FFN up-projections, then down-projections and values.

    Measured on all-MiniLM-L6-v2 mean+Normalize (onnxruntime 1.32, AVX512-VNNI): min cosine
    to fp32 over the 16 parity rows and over the 2,886 STS-B dev sentences, STS-B dev
    Spearman delta (fp32 86.72), batch: min cosine of 64 dev sentences (one of 60 joined
    ones, 256 tokens) alone vs in one padded batch; calibration 300 wiki_en sentences,
    unpadded batches. speed: 1 thread, 96 dev sentences at batch 32, 5 interleaved rounds
    in one process on a loaded shared machine, median ratio of sentences/s to dynamic.

      recipe                                 parity  STS dev  STS    batch     speed
      MinMax, uint8 asym, smoothed (this)    0.9865  0.9832   -0.07  1.00000   0.99
      + int8 attention matmuls (Q.K^T, P.V)  0.9838  0.9860   -0.09  1.00000   0.97
      MinMax, no smoothing                   0.9417  0.9694   -0.23  1.00000
      MinMax, int8 symmetric activations     0.9398  0.9547   -0.30  1.00000   (18 of 36
        MatMuls fused to int8 kernels; the rest ran DequantizeLinear + fp32 MatMul)
      MinMax, no smoothing, int8 attention   0.9292  0.9693   -0.17  1.00000
      Percentile 99.999, smoothed            0.9887  0.9876   -0.09  1.00000   (*)
      Percentile 99.99, smoothed             0.9051  0.9127   -0.80  1.00000   (*)
      Entropy, smoothed                      identical to MinMax in every figure (*)
      MinMax, smoothed, padded calibration   0.9873  0.9887   -0.15  1.00000
        batches (16 sentences of mixed length; padded tokens enter the ranges)
      was: dynamic, smoothed (quantize_dynamic, per-channel int8 weights)
                                             0.9855  0.9835   -0.07  0.99387   1.00
      was: dynamic, no smoothing             0.958 (parity), STS-B dev -0.06
    (*) onnxruntime's histogram calibrators reject batches of different sequence lengths
    (np.asarray over ragged arrays); measured with the arrays flattened first, not shipped.
    MinMax needs no workaround and its STS-B loss is the smallest; Percentile 99.999's
    higher min cosines are within the spread of a calibration sample.
    The session runs QuantizeLinear (24: Q/K/V share one) + MatMulIntegerToFloat (36), the
    u8s8 VNNI kernels; the six attention MatMuls stay fp32.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    recipe = recipe or Int8Recipe()

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    symmetric = recipe.activations == "int8"
    skip = list(exclude or [])
    if not recipe.attention:  # onnxruntime's QDQ path ignores MatMulConstBOnly
        skip += _activation_matmuls(src)
    smoothed = dst.with_name(f".{dst.stem}.smoothed.onnx")
    try:
        count = smooth_layernorm_inputs(src, smoothed, feeds, exclude) if recipe.smooth else 0
        with _quiet():
            quantize_static(
                str(smoothed if count else src),
                str(dst),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=skip,
                calibrate_method=methods[recipe.method],
                extra_options={
                    "ActivationSymmetric": symmetric,
                    "WeightSymmetric": True,
                    "MatMulConstBOnly": not recipe.attention,
                    "OpTypesToExcludeOutputQuantization": ["MatMul"],
                    "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                    "CalibPercentile": recipe.percentile,
                },
            )
    finally:
        smoothed.unlink(missing_ok=True)
    return count


def to_fp16(src: Path, dst: Path) -> None:
    """Convert weights and compute to float16; inputs and the output stay int64/float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dst))

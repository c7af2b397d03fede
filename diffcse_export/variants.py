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
           trained tiny model, and it is a few percent of the compute. Before quantizing,
           the outlier channels of LayerNorm outputs are moved into the weights that read
           them (`smooth_layernorm_inputs`, see `quantize_int8` for why).
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


# Calibration text for the activation ranges of `smooth_layernorm_inputs`: short and long,
# several languages; deliberately not the parity batch the gate measures.
CALIBRATION_SENTENCES = (
    "The cat sat on the mat.",
    "Yes.",
    "A child is eating an apple in the kitchen.",
    "Prices rose sharply last quarter, according to the report released on Monday morning.",
    "Where can I buy tickets?",
    "thanks",
    "Der Hund schläft unter dem Tisch.",
    "Two men are playing football in a park while people watch from the benches nearby.",
    "I don't know.",
    "An airplane is taking off.",
    "The results were published in 2019 by a team of researchers.",
    "Good morning!",
)
SMOOTH_ALPHA = 0.5  # s = max|x|^a / max|w|^(1-a): half of each channel's range moves


def _calibration_feeds(session, tokenizer_file: Path) -> list[dict]:
    """One unpadded feed per calibration sentence, for whatever inputs the graph has."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.no_truncation()
    feeds = []
    for enc in tok.encode_batch(list(CALIBRATION_SENTENCES)):
        ids = np.array([enc.ids], dtype=np.int64)
        values = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds.append({i.name: values.get(i.name, np.zeros_like(ids)) for i in session.get_inputs()})
    return feeds


def smooth_layernorm_inputs(
    src: Path, dst: Path, tokenizer_file: Path, exclude: list[str] | None = None
) -> int:
    """Rescale the channels of every LayerNorm output read by weight MatMuls; return how many.

    For each LayerNormalization output x that feeds MatMuls with a constant 2-D weight
    (in BERT-family layers: query/key/value, and the FFN up-projection), a per-channel
    s = max|x|^a / max|W row|^(1-a) (a = SMOOTH_ALPHA, max|x| over CALIBRATION_SENTENCES,
    max|W row| over all readers, geometric mean 1) gives x' = x / s, a new Mul node, and
    W' = diag(s) W for each reader, so x' W' = x W in exact arithmetic: the fp32 graph
    computes the same function (SmoothQuant, Xiao et al. 2022, for dynamic quantization).
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
        for feed in _calibration_feeds(session, tokenizer_file):
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


def quantize_int8(
    src: Path,
    dst: Path,
    exclude: list[str] | None = None,
    tokenizer_file: Path | None = None,
) -> int:
    """Dynamic int8 quantization of MatMul weights, per output channel; `exclude` stay fp32.

    With `tokenizer_file`, `smooth_layernorm_inputs` runs first; returns how many LayerNorm
    outputs it rescaled (0: quantized as is).

    Why: dynamic quantization gives each MatMul input one uint8 scale for the whole batch,
    and BERT-family encoders carry massive activations in a few residual channels after
    LayerNorm (all-MiniLM-L6-v2: channel 99 reaches 21-30 on [CLS] in the post-attention
    LayerNorm, while the other tokens stay under 6-10), so every other token is quantized
    in steps of ~0.12 against an RMS of ~0.6. Weight quantization alone costs little
    (weights-only int8: min cosine 0.9965). With [CLS] pooling that passed (0.9936), but
    mean pooling of a 2-3 token sentence averages just those coarse tokens. On the 16
    parity rows of MiniLM mean+Normalize, all 36 MatMuls in int8 gave min cosine 0.958
    ("ok"; "" 0.973, "Hi!" 0.980) and STS-B dev -0.06. No single MatMul is the cause
    (quantizing any one alone: >= 0.9945; leaving any one fp32: <= 0.9751). The error adds
    up over layers, most of it from the FFN up-projections (1 - cos 0.016 of the 0.036
    summed over the 36 singles on "ok"), then down-projections (0.012) and values (0.007).

    Measured on MiniLM mean (min cosine over the parity rows):
      smoothing the LayerNorm readers, all 36 MatMuls int8 (this recipe)  0.9855, STS-B dev
        -0.05; [CLS] pooling 0.9963, +0.02; same speed (0.99x the sentences/s)
      alpha 0.4 / 0.6; 4 calibration sentences; 1 sentence      0.985 / 0.981; 0.985; 0.977
      smoothing the GELU-fed down-projections too               0.978 (their outliers are
        per token, [CLS], not per channel)
      no smoothing, FFN up-projections fp32 (1/3 of MatMul FLOPs)  0.9845, 0.64x sentences/s
      no smoothing, FFN down-projections fp32                   0.978
      extra_options WeightSymmetric=False / ActivationSymmetric=True  0.958 (no change;
        MatMulConstBOnly is already the dynamic default)
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    smoothed = dst.with_name(f".{dst.stem}.smoothed.onnx")
    try:
        count = 0
        if tokenizer_file is not None:
            count = smooth_layernorm_inputs(src, smoothed, tokenizer_file, exclude)
        with _quiet():
            quantize_dynamic(
                str(smoothed if count else src),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul"],
                nodes_to_exclude=exclude or [],
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

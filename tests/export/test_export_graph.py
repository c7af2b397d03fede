"""Exported graphs equal PyTorch: [CLS] only, dynamic axes, folded projector, variants.

Exports are slow (seconds each), so each graph is exported once per session: tiny BERT
through conftest's `tiny_model_dir`, tiny RoBERTa, and a tiny checkpoint with a
BatchNorm projector together with all three variants.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from diffcse_export import ExportOptions, export_model  # noqa: E402
from diffcse_export.cls_layer import CLS_PRUNED, prunable  # noqa: E402
from diffcse_export.graph import SentenceEmbedding, head_nodes, load_checkpoint  # noqa: E402
from diffcse_export.validate import compare, gate, onnx_outputs, parity_inputs  # noqa: E402
from diffcse_export.variants import (  # noqa: E402
    FUSED_OPS,
    graph_feeds,
    op_counts,
    smooth_layernorm_inputs,
)
from diffcse_runtime import Encoder, load_metadata  # noqa: E402
from tests.support import tiny  # noqa: E402
from tests.support.export_helpers import make_checkpoint, make_sts_dir, scale_last_weight  # noqa: E402

SHAPES = [(1, 3), (37, 3), (1, 128), (37, 128)]


@pytest.fixture(scope="session")
def tiny_sts(tmp_path_factory) -> Path:
    return make_sts_dir(tmp_path_factory.mktemp("tiny_sts"))


@pytest.fixture(scope="session")
def projector_ckpt(tiny_bert, tmp_path_factory) -> Path:
    return make_checkpoint(tiny_bert, tmp_path_factory.mktemp("run") / "best")


@pytest.fixture(scope="session")
def projector_export(projector_ckpt, tiny_sts, tmp_path_factory):
    """The projector checkpoint exported with --with-projector and every variant.

    A random 2-layer model maps all sentences to nearly the same direction, so quantization
    noise reorders its STS cosines: the lossy variants' STS delta is reported, not gated,
    here (the real-model test gates it).
    """
    opts = ExportOptions(
        with_projector=True, optimize=True, quantize="int8", fp16=True, sts_data=tiny_sts
    )
    opts.thresholds["int8"].max_sts_delta = None
    opts.thresholds["fp16"].max_sts_delta = None
    out = tmp_path_factory.mktemp("exports") / "proj" / "model.onnx"
    reports = export_model(projector_ckpt, out, opts)
    return out.parent, {r.variant: r for r in reports}


@pytest.fixture(scope="session")
def roberta_export(tiny_roberta, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "roberta"
    export_model(tiny_roberta, out)
    return out


def random_batch(rows: int, width: int, vocab: int, cls: int, sep: int, pad: int, seed: int = 0):
    """Rows of random length (one full-width row), [CLS] first, [SEP] last, then padding."""
    rng = np.random.default_rng(seed)
    ids = np.full((rows, width), pad, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    lengths = rng.integers(2, width + 1, size=rows)
    lengths[0] = width
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(5, vocab, size=n)
        ids[i, 0], ids[i, n - 1] = cls, sep
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def torch_reference(module, feed) -> np.ndarray:
    with torch.no_grad():
        out = module(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
    return out.numpy()


def assert_matches_torch(model_dir: Path, module, tokenizer, shapes=SHAPES) -> None:
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    special = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    for rows, width in shapes:
        feed = random_batch(rows, width, len(tokenizer), *special, seed=rows * width)
        got = session.run(["sentence_embedding"], feed)[0]
        want = torch_reference(module, feed)
        assert got.shape == want.shape == (rows, module.encoder.config.hidden_size)
        assert np.abs(got - want).max() < 1e-5, (rows, width, np.abs(got - want).max())


# ---------------------------------------------------------------- [CLS] graphs


def test_bert_cls_graph_equals_pytorch_on_dynamic_shapes(tiny_model_dir, tiny_bert):
    ckpt = load_checkpoint(tiny_bert)
    assert_matches_torch(tiny_model_dir, SentenceEmbedding(ckpt.encoder).eval(), ckpt.tokenizer)


def test_roberta_cls_graph_equals_pytorch_on_dynamic_shapes(roberta_export, tiny_roberta):
    """RoBERTa derives position ids from input_ids and the pad id: padding must not shift them."""
    ckpt = load_checkpoint(tiny_roberta)
    assert_matches_torch(roberta_export, SentenceEmbedding(ckpt.encoder).eval(), ckpt.tokenizer)
    meta = load_metadata(roberta_export)
    assert meta.pad_token_id == 1 and meta.max_seq_length == 128  # 130 positions - (pad + 1)


@pytest.mark.parametrize("style", ["tiny_bert", "tiny_roberta"])
def test_last_layer_pruned_to_cls_equals_the_full_layer(style, request):
    """The pruned last layer is the same function on padded batches, BERT and RoBERTa."""
    ckpt = load_checkpoint(request.getfixturevalue(style))
    assert prunable(ckpt.encoder)
    full = SentenceEmbedding(ckpt.encoder).eval()
    pruned = SentenceEmbedding(ckpt.encoder, prune_last=True).eval()
    tok = ckpt.tokenizer
    for rows, width in SHAPES:
        feed = random_batch(
            rows,
            width,
            len(tok),
            tok.cls_token_id,
            tok.sep_token_id,
            tok.pad_token_id,
            seed=rows + width,
        )
        want, got = torch_reference(full, feed), torch_reference(pruned, feed)
        assert np.abs(got - want).max() < 1e-5


def test_exported_graph_drops_the_dead_full_last_layer(tiny_model_dir, tiny_bert):
    """8 matrix products per layer (Q, K, V, scores, context, out, 2 FFN) and no dead copy
    of the full last layer; the pruned layer's out/FFN products act on [batch, dim] rows
    (Gemm). The metadata says the graph was pruned."""
    layers = load_checkpoint(tiny_bert).encoder.config.num_hidden_layers
    ops = op_counts(tiny_model_dir / "model.onnx")
    assert ops["MatMul"] + ops["Gemm"] == 8 * layers
    assert ops["Gemm"] == 3
    assert CLS_PRUNED in load_metadata(tiny_model_dir).validation["notes"]


def test_encoders_of_another_layout_are_not_pruned():
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    assert not prunable(DistilBertModel(config))


def test_graph_has_only_ids_and_mask_in_and_one_embedding_out(tiny_model_dir):
    graph = onnx.load(str(tiny_model_dir / "model.onnx")).graph
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for t in inputs.values():
        assert t.elem_type == onnx.TensorProto.INT64
        assert all(d.dim_param and not d.dim_value for d in t.shape.dim)  # both axes symbolic
    (output,) = graph.output
    assert output.name == "sentence_embedding"
    dims = output.type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 32
    meta = load_metadata(tiny_model_dir)
    assert meta.opset == 18 and meta.variant == "fp32" and not meta.projector_folded
    assert meta.validation["passed"] and meta.validation["numeric"]["max_abs_diff"] < 1e-5
    assert "skipped" in meta.validation["sts"]


# ---------------------------------------------------------------- folded projector


def test_folded_projector_graph_equals_unfolded_pytorch(projector_export, projector_ckpt):
    out, _ = projector_export
    ckpt = load_checkpoint(projector_ckpt)
    assert ckpt.projector == "batchnorm"
    unfolded = SentenceEmbedding(ckpt.encoder, ckpt.head).eval()
    assert_matches_torch(out, unfolded, ckpt.tokenizer)
    nodes = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert "BatchNormalization" not in nodes
    assert nodes[-5:] == ["MatMul", "Add", "Relu", "MatMul", "Add"]
    meta = load_metadata(out)
    assert meta.projector_folded and meta.embedding_dim == 32


# ---------------------------------------------------------------- variants


def test_every_variant_is_a_validated_loadable_model_dir(projector_export):
    out, reports = projector_export
    assert list(reports) == ["fp32", "optimized", "int8", "fp16"]
    texts = ["a man is playing a guitar .", "the child draws a red car"]
    reference = Encoder(out).encode(texts)
    for variant, report in reports.items():
        folder = out if variant == "fp32" else out.with_name(f"{out.name}-{variant}")
        meta = load_metadata(folder)
        assert meta.variant == variant and meta.projector_folded
        val = meta.validation
        assert val["passed"] and val["thresholds"] == report.to_json()["thresholds"]
        sts = val["sts"]
        assert sts["task"] == "STSBenchmark" and sts["split"] == "dev" and sts["n_pairs"] == 150
        assert np.isfinite([sts["pytorch"], sts["onnx"], sts["delta"]]).all()
        assert sts["delta"] == pytest.approx(sts["onnx"] - sts["pytorch"])
        emb = Encoder(folder).encode(texts)
        assert emb.shape == reference.shape
        cos = (
            (emb * reference).sum(1)
            / np.linalg.norm(emb, axis=1)
            / np.linalg.norm(reference, axis=1)
        )
        assert cos.min() > 0.99, (variant, cos)
    assert abs(reports["fp32"].sts["delta"]) <= 0.05
    assert reports["fp32"].numeric["max_abs_diff"] < 1e-5


def test_optimized_graph_has_fused_attention_layernorm_gelu(projector_export):
    out, reports = projector_export
    counts = op_counts(out.with_name(f"{out.name}-optimized") / "model.onnx")
    full = 1  # layers fused whole: the last one runs for [CLS] only and is left unfused
    assert counts.get("Attention") == full
    assert counts.get("SkipLayerNormalization") == 2 * full
    assert counts.get("BiasGelu") == full
    assert reports["optimized"].fused_ops == {op: counts[op] for op in FUSED_OPS if op in counts}
    assert reports["optimized"].numeric["max_abs_diff"] < 1e-4


def test_int8_variant_quantizes_matmuls_and_reports_its_sts_delta(projector_export):
    out, reports = projector_export
    int8 = out.with_name(f"{out.name}-int8") / "model.onnx"
    counts = op_counts(int8)
    model = onnx.load(str(int8))
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    int8_matmuls = [
        n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dequantized
    ]
    # static QDQ: Q/K/V, output, FFN up and down of layer 0, and Q/K/V of the last layer;
    # the last layer's [CLS]-row-only Gemms (diffcse_export.cls_layer) stay fp32
    assert len(int8_matmuls) == 9
    assert counts.get("Gemm") == 3
    assert counts.get("QuantizeLinear", 0) > 0 and "DynamicQuantizeLinear" not in counts
    # LayerNorm outputs read by MatMuls are rescaled first (variants.smooth_layernorm_inputs)
    graph_nodes = onnx.load(str(int8)).graph.node
    assert any(n.op_type == "Mul" and n.name.endswith("_smooth") for n in graph_nodes)
    # the folded projector stays float32 (see diffcse_export.variants)
    assert len(head_nodes(out / "model.onnx")) == 5
    nodes = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert nodes[-5:] == ["MatMul", "Add", "Relu", "MatMul", "Add"]
    report = reports["int8"]
    assert report.numeric["min_cosine"] >= 0.98
    assert report.sts["delta"] == pytest.approx(report.sts["onnx"] - report.sts["pytorch"])


def test_int8_smoothing_keeps_the_fp32_function_and_moves_scale_into_weights(
    tiny_model_dir, tmp_path
):
    """x W == (x / s)(diag(s) W): the rescaled graph computes what the export did."""
    src, tokenizer = tiny_model_dir / "model.onnx", tiny_model_dir / "tokenizer.json"
    dst = tmp_path / "smoothed.onnx"
    meta = load_metadata(tiny_model_dir)
    feeds = graph_feeds(src, tiny.corpus(40), tokenizer, meta.max_seq_length)
    # [CLS] graph, 2 layers: layer 0's QKV and FFN input, layer 1's K/V input (its [CLS]-only
    # query and FFN read a slice of the LayerNorm output, so they stay as they are)
    assert smooth_layernorm_inputs(src, dst, feeds) == 3
    feed = parity_inputs(tokenizer, meta.max_seq_length, meta.pad_token_id)
    before, _ = onnx_outputs(src, feed)
    after, _ = onnx_outputs(dst, feed)
    assert np.abs(after - before).max() < 1e-5
    model = onnx.load(str(dst))
    inverse = [i for i in model.graph.initializer if i.name.endswith("_smooth_inv")]
    assert len(inverse) == 3
    assert all(np.ptp(onnx.numpy_helper.to_array(i)) > 0 for i in inverse)  # not all ones


def test_fp16_variant_stores_half_weights_and_keeps_float32_io(projector_export):
    out, reports = projector_export
    model = onnx.load(str(out.with_name(f"{out.name}-fp16") / "model.onnx"))
    types = {init.data_type for init in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert reports["fp16"].numeric["min_cosine"] > 0.999


# ---------------------------------------------------------------- the gate


def test_gate_fails_on_a_perturbed_weight(tiny_model_dir, tiny_bert, tmp_path):
    """Scale one weight matrix of a correct graph by 1.01: numeric parity must catch it."""
    model = onnx.load(str(tiny_model_dir / "model.onnx"))
    scale_last_weight(model, 1.01)
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))

    ckpt = load_checkpoint(tiny_bert)
    inputs = parity_inputs(tiny_model_dir / "tokenizer.json", 128, ckpt.pad_token_id)
    expected = torch_reference(SentenceEmbedding(ckpt.encoder).eval(), inputs)
    from diffcse_export.validate import DEFAULT_THRESHOLDS, VariantReport

    good = VariantReport("fp32", 0.0, DEFAULT_THRESHOLDS["fp32"])
    good.numeric = compare(onnx_outputs(tiny_model_dir / "model.onnx", inputs)[0], expected)
    assert gate(good) == []
    broken = VariantReport("fp32", 0.0, DEFAULT_THRESHOLDS["fp32"])
    broken.numeric = compare(onnx_outputs(bad, inputs)[0], expected)
    (failure,) = gate(broken)
    assert "max abs difference" in failure and "exceeds 0.0001" in failure

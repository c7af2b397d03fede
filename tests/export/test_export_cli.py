"""diffcse-export as a user runs it: bad input, the gate, all-or-nothing output.

Bad input fails before any export. The gate and success paths replace only the
torch.onnx step with a copy of the real export of the same tiny BERT (conftest's
`tiny_model_dir`), optionally with one weight perturbed; loading, variants, validation
and the writing of the folders are the real ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from click.testing import CliRunner  # noqa: E402

from diffcse_export import graph  # noqa: E402
from diffcse_export.cli import main  # noqa: E402
from diffcse_runtime import Encoder, load_metadata  # noqa: E402
from tests.support.export_helpers import make_checkpoint, make_sts_dir, scale_last_weight  # noqa: E402


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_refused(result, *phrases: str, out: Path | None = None) -> None:
    """Exit 1, one line naming the problem, no traceback, nothing written."""
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: ") and "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in message, message
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.fixture
def fake_export(tiny_model_dir, monkeypatch):
    """Make graph.export_onnx copy the real tiny BERT export; `scale` perturbs one weight."""
    state = {"scale": 1.0}

    def export_onnx(module, path, example, max_seq_length, opset=graph.OPSET):
        model = onnx.load(str(tiny_model_dir / "model.onnx"))
        if state["scale"] != 1.0:
            scale_last_weight(model, state["scale"])
        onnx.save(model, str(path))

    monkeypatch.setattr(graph, "export_onnx", export_onnx)
    return state


@pytest.fixture(scope="module")
def run_dir(tiny_bert, tmp_path_factory) -> Path:
    """A diffcse-train output folder: best/ holds the encoder and a 'none' head."""
    run = tmp_path_factory.mktemp("train_run")
    make_checkpoint(tiny_bert, run / "best", projector="none")
    return run


# ---------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    out = tmp_path / "out"
    assert_refused(run(tmp_path / "nope", out / "model.onnx"), "no such folder", out=out)


def test_folder_that_is_not_a_checkpoint(tmp_path):
    src = tmp_path / "notes"
    src.mkdir()
    (src / "readme.txt").write_text("hello")
    out = tmp_path / "out"
    assert_refused(run(src, out / "model.onnx"), "not a checkpoint", "config.json", out=out)


def test_checkpoint_without_tokenizer(tiny_bert, tmp_path):
    src = tmp_path / "no_tok"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert / name, src / name)
    out = tmp_path / "out"
    assert_refused(run(src, out / "model.onnx"), str(src), "tokenizer is missing", out=out)


def test_existing_output_is_refused_without_overwrite(tiny_bert, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(run(tiny_bert, out / "model.onnx"), str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = run(tiny_bert, out / "model.onnx", "--overwrite")
    assert_refused(result, "not a model directory")
    assert (out / "keep.txt").read_text() == "mine"


def test_existing_variant_output_is_refused(tiny_bert, tmp_path):
    (tmp_path / "out-int8").mkdir()
    result = run(tiny_bert, tmp_path / "out" / "model.onnx", "--quantize", "int8")
    assert_refused(result, "out-int8", "already exists", out=tmp_path / "out")


def test_graph_file_must_be_called_model_onnx(tiny_bert, tmp_path):
    assert_refused(run(tiny_bert, tmp_path / "out" / "encoder.onnx"), "model.onnx")


def test_bad_threshold_option(tiny_bert, tmp_path):
    assert_refused(run(tiny_bert, tmp_path / "o", "--atol", "1e-4"), "VARIANT=VALUE")
    assert_refused(run(tiny_bert, tmp_path / "o", "--atol", "fp32=small"), "not a number")


def test_with_projector_needs_a_projector(tiny_bert, tmp_path):
    out = tmp_path / "out"
    result = run(tiny_bert, out, "--with-projector")
    assert_refused(result, "no projector", "without --with-projector", out=out)


def test_projector_of_the_wrong_size(tiny_bert, tiny_roberta, tmp_path):
    ckpt = make_checkpoint(tiny_bert, tmp_path / "ckpt")
    other = make_checkpoint(tiny_bert, tmp_path / "ckpt16")
    from safetensors.torch import load_file, save_file

    state = {
        k: v[:16] if v.ndim else v
        for k, v in load_file(str(other / "projector.safetensors")).items()
    }
    save_file(state, str(ckpt / "projector.safetensors"))
    out = tmp_path / "out"
    result = run(ckpt, out, "--with-projector")
    assert_refused(
        result, "projector.safetensors", "batchnorm projector for hidden size 32", out=out
    )


def test_unknown_projector_kind(tiny_bert, tmp_path):
    ckpt = make_checkpoint(tiny_bert, tmp_path / "ckpt")
    head = json.loads((ckpt / "diffcse_head.json").read_text())
    (ckpt / "diffcse_head.json").write_text(json.dumps({**head, "projector": "mlp"}))
    assert_refused(run(ckpt, tmp_path / "out"), "diffcse_head.json", "'projector'", "'mlp'")


def test_max_seq_length_beyond_position_table(tiny_bert, tmp_path):
    result = run(tiny_bert, tmp_path / "out", "--max-seq-length", "1000")
    assert_refused(result, "1000", "128 positions", out=tmp_path / "out")


# ---------------------------------------------------------------- the gate and the output


def test_perturbed_graph_fails_the_gate_and_writes_nothing(fake_export, tiny_bert, tmp_path):
    fake_export["scale"] = 1.01
    out = tmp_path / "models" / "tiny"
    out.parent.mkdir()
    result = run(tiny_bert, out / "model.onnx", "--quantize", "int8", "--sts-data", tmp_path / "no")
    assert result.exit_code == 1
    assert "FAIL" in result.output  # the table is printed before the error
    assert_refused(result, "validation failed", "fp32: max abs difference", out=out)
    assert not (out.parent / "tiny-int8").exists()


def test_export_writes_validated_model_dirs(fake_export, run_dir, tmp_path):
    sts = make_sts_dir(tmp_path / "sts")
    out = tmp_path / "models" / "tiny"
    args = [run_dir, out / "model.onnx", "--quantize", "int8", "--sts-data", sts]
    result = run(*args, "--max-sts-delta", "int8=none", "--atol", "fp32=2e-5")
    assert result.exit_code == 0, result.output
    assert "STS-B dev PyTorch" in result.output and "int8" in result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny", "tiny-int8"]
    meta = load_metadata(out)
    assert meta.source == str((run_dir / "best").resolve())  # a run folder resolves to best/
    assert meta.validation["thresholds"]["atol"] == 2e-5
    assert (
        load_metadata(out.with_name("tiny-int8")).validation["thresholds"]["max_sts_delta"] is None
    )
    assert Encoder(out).encode(["a cat"]).shape == (1, 32)

    assert_refused(run(*args), "already exists")
    again = run(*args, "--overwrite", "--max-sts-delta", "int8=none")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny", "tiny-int8"]


def test_missing_sts_data_is_noted_and_numeric_parity_still_gates(fake_export, tiny_bert, tmp_path):
    out = tmp_path / "out"
    result = run(tiny_bert, out, "--sts-data", tmp_path / "absent")
    assert result.exit_code == 0, result.output
    assert "semantic parity skipped" in result.output
    sts = load_metadata(out).validation["sts"]
    assert "skipped" in sts and str(tmp_path / "absent") in sts["skipped"]

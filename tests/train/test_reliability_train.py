"""Issue 12, training and export defects: bad weights and output folders are one sentence,
and NaN weights are blamed on the weights, not on the exported graph."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from diffcse_train.cli import train_cmd  # noqa: E402
from diffcse_train.config import TrainConfig  # noqa: E402
from tests.support import tiny  # noqa: E402


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(tiny.corpus(64, seed=1)) + "\n", encoding="utf-8")
    return path


def run_train(tmp_path, model: str, corpus, out) -> str:
    cfg = TrainConfig(
        model_name_or_path=str(model), train_file=str(corpus), output_dir=str(out),
        batch_size=16, max_steps=1, lambda_weight=0.0, augmentation="none",
    )  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    res = CliRunner().invoke(train_cmd, ["--config", str(path), "--quiet"], catch_exceptions=False)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("Error: "), res.output
    return line


def _copy(tiny_bert, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(tiny_bert, dst)
    return dst


def test_corrupt_safetensors_is_one_sentence(tiny_bert, corpus_file, tmp_path):
    model = _copy(tiny_bert, tmp_path, "corrupt")
    (model / "model.safetensors").write_bytes(b"not a safetensors file at all")
    line = run_train(tmp_path, model, corpus_file, tmp_path / "out")
    assert str(model) in line and "corrupt or truncated" in line


def test_pickle_bin_with_objects_is_refused_in_one_sentence(tiny_bert, corpus_file, tmp_path):
    model = _copy(tiny_bert, tmp_path, "pickled")
    (model / "model.safetensors").unlink()
    torch.save({"weights": np.dtype("float32")}, model / "pytorch_model.bin")
    line = run_train(tmp_path, model, corpus_file, tmp_path / "out")
    assert "pickled objects" in line and "safetensors" in line


def test_truncated_bin_is_one_sentence(tiny_bert, corpus_file, tmp_path):
    from safetensors.torch import load_file

    model = _copy(tiny_bert, tmp_path, "truncated")
    state = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    data = (model / "pytorch_model.bin").read_bytes()
    (model / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    line = run_train(tmp_path, model, corpus_file, tmp_path / "out")
    assert "cannot load a Hugging Face model" in line


def test_file_typed_output_dir_is_one_sentence(tiny_bert, corpus_file, tmp_path):
    out = tmp_path / "out"
    out.write_text("a user's file")
    line = run_train(tmp_path, tiny_bert, corpus_file, out)
    assert "is a file, not a folder" in line
    assert out.read_text() == "a user's file"
    line = run_train(tmp_path, tiny_bert, corpus_file, out / "run")
    assert "is a file, not a folder" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_dir_is_one_sentence(tiny_bert, corpus_file, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = run_train(tmp_path, tiny_bert, corpus_file, locked / "run")
    finally:
        locked.chmod(0o700)
    assert "no permission to write" in line


def test_nan_weights_are_blamed_on_the_weights_not_the_graph():
    from diffcse_export import validate

    nan = np.full((4, 8), np.nan, np.float32)
    report = validate.VariantReport("fp32", 1.0, validate.Thresholds())
    report.numeric = validate.compare(nan, nan)  # ONNX and PyTorch both give NaN
    (failure,) = validate.gate(report)
    assert "PyTorch itself gives NaN" in failure and "weights are bad" in failure
    report.numeric = validate.compare(nan, np.ones((4, 8), np.float32))  # only the graph
    (failure,) = validate.gate(report)
    assert "the graph produces NaN" in failure


def test_export_overwrite_never_replaces_a_user_folder_that_appeared(
    tiny_bert, tiny_model_dir, tmp_path, monkeypatch
):
    """The start-time check passes (a model dir is there); while the graph is exported the
    user swaps in a folder of their own: the publish re-checks and refuses it."""
    from diffcse_export import graph
    from diffcse_export.cli import main

    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)

    def export_onnx(module, path, example, max_seq_length, opset=graph.OPSET):
        shutil.copy(tiny_model_dir / "model.onnx", path)  # the real export of the same model
        shutil.rmtree(out)
        out.mkdir()
        (out / "notes.txt").write_text("the user's notes")

    monkeypatch.setattr(graph, "export_onnx", export_onnx)
    args = [str(tiny_bert), str(out), "--overwrite", "--sts-data", str(tmp_path / "none")]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "not a model directory" in res.output.strip().splitlines()[-1]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

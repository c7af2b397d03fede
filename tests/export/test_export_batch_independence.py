"""A text's vector never depends on its batch neighbours, in every variant export writes.

Dynamic int8 took one activation scale over the whole padded batch, so a short sentence
beside long neighbours was quantized in coarser steps than alone; the static int8 variant
fixes every scale at export from calibration text (`--calibration-file`, default
builtin:wiki_en), which the metadata records.

A freshly initialised tiny BERT hardly uses its layers (weights of std 0.02 next to a
residual stream of std 1), so quantization noise cannot show; its encoder weights are
scaled by 8 here, which makes each layer move the vector as a trained one does. It also
maps every text near one direction (two texts' cosine ~0.93), so vectors are compared
after subtracting the batch mean: the part that tells texts apart. On that measure the
old dynamic int8 gave 0.9997 (plain cosine 0.99997), every other variant 1.0000.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from diffcse_export import ExportOptions, export_model  # noqa: E402
from diffcse_export.cli import main  # noqa: E402
from diffcse_export.variants import VARIANTS  # noqa: E402
from diffcse_runtime import load_metadata  # noqa: E402
from tests.support import tiny  # noqa: E402
from tests.support.cli import refused, run  # noqa: E402

MAX_LEN = 128
SHORT = ["a man is playing a guitar .", "the child draws a red car", "ok"]


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(tiny.corpus(60, seed=3)) + "\n\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def busy_bert(tiny_bert, tmp_path_factory) -> Path:
    """tiny_bert with its encoder's weight matrices scaled by 8 (see the module docstring)."""
    import shutil

    import torch
    from transformers import AutoModel

    out = tmp_path_factory.mktemp("busy") / "bert"
    shutil.copytree(tiny_bert, out)
    model = AutoModel.from_pretrained(out)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.startswith("encoder.") and weight.dim() == 2:
                weight.mul_(8.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def every_variant(busy_bert, calibration_file, tmp_path_factory) -> Path:
    """busy_bert, mean pooled, exported with every variant; int8 calibrated on a file."""
    out = tmp_path_factory.mktemp("exports") / "tiny"
    opts = ExportOptions(
        pooling="mean",
        optimize=True,
        quantize="int8",
        fp16=True,
        sts_data=None,
        max_seq_length=MAX_LEN,
        calibration_file=calibration_file,
    )
    export_model(busy_bert, out, opts)
    return out


def _neighbours() -> list[str]:
    """Long, repetitive rows: their activations reach further than any short sentence's."""
    words = tiny.corpus(40, seed=5)
    return [" ".join(words[i : i + 12]) for i in range(0, 36, 4)] + [
        "guitar " * 120,
        "! ? . , " * 30,
    ]


def _run(session, tokenizer, texts: list[str]) -> np.ndarray:
    """One session call over `texts`, padded to the longest, as the runtime batches."""
    encs = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encs)
    ids = np.zeros((len(texts), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, enc in enumerate(encs):
        ids[row, : len(enc.ids)] = enc.ids
        mask[row, : len(enc.ids)] = 1
    feed = {"input_ids": ids, "attention_mask": mask}
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_vector_is_the_same_alone_and_among_long_neighbours(every_variant, variant):
    import onnxruntime as ort
    from tokenizers import Tokenizer

    folder = every_variant if variant == "fp32" else every_variant.with_name(f"tiny-{variant}")
    assert load_metadata(folder).variant == variant
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_LEN)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = _neighbours()
    for at, text in zip((0, 4, len(batch)), SHORT, strict=True):
        batch.insert(at, text)
    together = _run(session, tokenizer, batch)
    center = together.mean(0)
    for text in SHORT:
        alone = _run(session, tokenizer, [text])[0]
        row = together[batch.index(text)]
        assert _cosine(alone, row) >= 0.9999, (variant, text)
        assert _cosine(alone - center, row - center) >= 0.9999, (variant, text)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_int8_metadata_records_its_calibration(every_variant, calibration_file):
    validation = load_metadata(every_variant.with_name("tiny-int8")).validation
    assert validation["calibration"] == {
        "source": str(calibration_file),
        "sentences": 60,
        "available": 60,
    }
    assert any("calibrated on 60 sentences" in note for note in validation["notes"])
    assert "calibration" not in load_metadata(every_variant).validation
    card = (every_variant.with_name("tiny-int8") / "README.md").read_text(encoding="utf-8")
    assert f"fixed at export from 60 sentences of `{calibration_file}`" in card


def test_a_bad_calibration_file_is_one_sentence_naming_file_and_line(tiny_bert, tmp_path):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"a fine sentence\nanother one\nbroken \xff byte\n")
    out = tmp_path / "out"
    args = [tiny_bert, out, "--quantize", "int8", "--calibration-file", bad, "--sts-data", "none"]
    refused(run(main, args), f"--calibration-file {bad}:3: not valid UTF-8")
    assert not out.exists() and not (tmp_path / "out-int8").exists()

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    args[5] = empty
    refused(run(main, args), f"--calibration-file {empty}: no sentences")
    refused(run(main, args[:2] + args[4:]), "--calibration-file", "--quantize int8")

"""An exported model directory explains itself and other tools read it: the README.md model
card (hub front matter, pooling, variant, the validation table), tokenizer_config.json and
special_tokens_map.json (AutoTokenizer tokenizes and truncates as our Encoder does), and
fastembed's custom-model path returns our embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
from diffcse_runtime import Encoder, load_metadata  # noqa: E402
from tests.support import tiny  # noqa: E402

TEXTS = tiny.corpus(6, seed=7) + ["", " ".join(tiny.corpus(40, seed=1))]  # empty; truncated


@pytest.fixture(scope="module")
def exported(tiny_bert, tmp_path_factory):
    """tiny_bert exported fp32 + int8 (two model directories, one table)."""
    from diffcse_export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("interop") / "tiny-encoder"
    reports = export_model(
        tiny_bert, out, ExportOptions(quantize="int8", max_seq_length=48, sts_data=None)
    )
    return out, reports


def test_model_card_has_hub_front_matter_and_says_what_the_model_is(exported):
    from huggingface_hub import ModelCard

    out, reports = exported
    for folder, variant in ((out, "fp32"), (out.with_name(out.name + "-int8"), "int8")):
        card = ModelCard.load(folder / "README.md")  # the hub's own parser
        assert card.data.library_name == "onnx"
        assert card.data.pipeline_tag == "sentence-similarity"
        assert {"diffcse", "sentence-embeddings", variant, "cls-pooling"} <= set(card.data.tags)
        text = card.text
        assert f"# {folder.name}" in text and f"| variant | {variant} |" in text
        assert "| pooling | cls ([CLS] state) |" in text
        assert "48 tokens" in text
        for report in reports:  # the table with every variant's row, and its limits
            assert f"- `{report.variant}`:" in text
        assert "max abs diff <= 0.0001" in text and "min cosine >= 0.98" in text
        assert "Exported from" in text  # a plain HF source: no training section
        assert f'Encoder("{folder.name}")' in text and "diffcse-serve --model" in text
        load_metadata(folder)  # the card is not among the hashed files: still verifies
        assert "README.md" not in load_metadata(folder).files


def test_tokenizer_files_make_autotokenizer_match_our_encoder(exported):
    from transformers import AutoTokenizer

    out, _ = exported
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 48 and config["pad_token"] == "[PAD]"
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loads on transformers 4 too
    specials = json.loads((out / "special_tokens_map.json").read_text())
    assert specials["cls_token"] == "[CLS]" and specials["mask_token"] == "[MASK]"
    theirs = AutoTokenizer.from_pretrained(str(out))(TEXTS, truncation=True)["input_ids"]
    ours = Encoder(out).tokenizer.encode_batch(TEXTS)
    assert [row.ids for row in ours] == theirs
    assert max(len(row) for row in theirs) == 48


def test_source_tokenizer_files_are_kept_with_our_limit(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    from diffcse_export.tokenizer_files import tokenizer_config

    source = tmp_path / "src"
    source.mkdir()
    (source / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer",
                    "model_max_length": 512, "name_or_path": "/home/someone/model"})
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    config = tokenizer_config(source, tokenizer, 256)
    assert config["do_lower_case"] is True and config["tokenizer_class"] == "BertTokenizer"
    assert config["model_max_length"] == 256 and "name_or_path" not in config


def test_fastembed_custom_model_gives_our_embeddings(exported):
    fastembed = pytest.importorskip("fastembed")
    from fastembed.common.model_description import ModelSource, PoolingType

    out, _ = exported
    meta = load_metadata(out)
    name = f"local/{out.name}-{id(out)}"  # registered once per process
    fastembed.TextEmbedding.add_custom_model(
        model=name, pooling=PoolingType.DISABLED, normalization=False,
        sources=ModelSource(hf=name), dim=meta.embedding_dim, model_file="model.onnx",
        output_name="sentence_embedding",
    )  # fmt: skip
    # specific_model_path: fastembed reads our folder and never looks the name up on a hub
    model = fastembed.TextEmbedding(name, specific_model_path=str(out), threads=1)
    theirs = np.stack(list(model.embed(TEXTS, batch_size=3)))
    ours = Encoder(out).encode(TEXTS)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)

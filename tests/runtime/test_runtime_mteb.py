"""Encoder speaks both MTEB protocols: v1's encode(list[str]) and v2's encode(DataLoader of
{"text": [...]} batches, task_metadata=..., ...) plus mteb_model_meta. The real mteb
package scores STS-B dev (our local SentEval copy, handed to mteb's own task object: no
download) to the same Spearman as diffcse-eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from diffcse_runtime import Encoder, sts
from diffcse_runtime.cli import evaluate_cmd
from diffcse_runtime.mteb_compat import texts_of
from tests.support import tiny

ROOT_TEXTS = ["a man is playing a guitar .", "two dogs run .", "", "the cat sleeps"]


def test_v1_lists_pass_through_unchanged():
    texts = ["a", "b"]
    assert texts_of(texts) is texts
    gen = (t for t in texts)
    assert texts_of(gen) is gen  # a generator of strings is not consumed
    assert texts_of("one") == "one"


def test_v2_dataloader_batches_encode_like_the_list(tiny_model_dir):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    enc = Encoder(tiny_model_dir)
    rows = [{"text": t, "title": "x"} for t in ROOT_TEXTS]
    loader = DataLoader(rows, batch_size=3, collate_fn=lambda b: {"text": [r["text"] for r in b]})
    got = enc.encode(
        loader, task_metadata=None, hf_split="dev", hf_subset="default", prompt_type=None
    )
    np.testing.assert_array_equal(got, enc.encode(ROOT_TEXTS))
    images = DataLoader([{"image": 1}], batch_size=1, collate_fn=lambda b: {"image": b})
    with pytest.raises(TypeError, match="MTEB batch 0 has no 'text' field.*image"):
        enc.encode(images)


@pytest.fixture(scope="module")
def spread_model_dir(tmp_path_factory):
    """A tiny encoder whose STS-B cosines spread over (0.4, 1): tiny_bert's default init
    puts every cosine within 1e-5 of 1, where float32 rounding alone reorders pairs."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModel

    from tests.support.tiny import export_model_dir

    root = tmp_path_factory.mktemp("mteb")
    source = tiny.make_encoder(root / "src")
    config = AutoConfig.from_pretrained(source, initializer_range=0.3)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(source)
    return export_model_dir(source, root / "spread")


def test_mteb_scores_stsb_dev_like_diffcse_eval(spread_model_dir, sts_data, tmp_path):
    mteb = pytest.importorskip("mteb")
    from datasets import Dataset, DatasetDict
    from mteb.models import EncoderProtocol

    enc = Encoder(spread_model_dir)
    assert isinstance(enc, EncoderProtocol)  # what mteb's STS task checks
    meta = enc.mteb_model_meta
    assert meta.name == "diffcse/spread" and meta.embed_dim == enc.embedding_dim
    assert meta.revision == enc.meta.onnx_sha256[:12]

    pairs = sts.load_task(sts_data, "STSBenchmark", "dev")  # the runtime's one loader
    task = mteb.get_task("STSBenchmark", eval_splits=["validation"])
    task.dataset = {
        "default": DatasetDict(
            validation=Dataset.from_dict(
                {"sentence1": pairs.sents1, "sentence2": pairs.sents2, "score": pairs.gold}
            )
        )
    }
    task.data_loaded = True  # mteb would otherwise download mteb/stsbenchmark-sts
    result = mteb.evaluate(
        enc, task, cache=None, overwrite_strategy="always", show_progress_bar=False
    )
    (task_result,) = result.task_results
    scores = task_result.scores["validation"][0]
    theirs = 100 * scores["cosine_spearman"]

    out = tmp_path / "eval.json"
    run = CliRunner().invoke(
        evaluate_cmd,
        ["--model", str(spread_model_dir), "--data", str(sts_data), "--tasks", "STSBenchmark",
         "--split", "dev", "--json", str(out)],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    ours = json.loads(out.read_text())["tasks"]["STSBenchmark"]
    assert ours["n_pairs"] == len(pairs) == 1500
    # mteb takes cosines in float32 (sklearn), diffcse-eval in float64: the same ranking up
    # to rounding near cos = 1 (STS-B dev's identical-sentence pair), ~1e-4 points here
    assert theirs == pytest.approx(ours["spearman"], abs=1e-3)
    assert 100 * scores["spearman"] == pytest.approx(theirs, abs=1e-3)  # similarity_pairwise

"""fit-generator: a copy of a tiny encoder trained as a masked LM (or only an MLM head on the
frozen encoder), saved as a normal masked LM folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from diffcse_runtime.errors import DataFormatError, DiffcseError  # noqa: E402
from diffcse_train.cli import fit_generator_cmd  # noqa: E402
from diffcse_train.generator import FitSettings, GeneratorRefused, fit_generator  # noqa: E402
from diffcse_train.generator.loop import collect, train_head, train_masked_lm  # noqa: E402
from diffcse_train.generator.masked_lm import (  # noqa: E402
    Masking,
    find_head,
    load_encoder_as_mlm,
    score,
)
from tests.support import tiny  # noqa: E402

# fp32 on tiny models (bf16 autocast only pays off at real sizes); the CLI fixture keeps
# the default precision, so the bf16 path runs once.
FAST = dict(
    epochs=2, batch_size=32, max_steps=40, lr=1e-2, min_eval_sentences=100, precision="fp32"
)
pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLI_FAST = ["--epochs", "2", "--batch-size", "32", "--max-steps", "40", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "sentences.txt"
    lines = tiny.corpus(1200)
    lines.insert(5, "")  # empty lines are skipped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fitted(tiny_bert, corpus_file, tmp_path_factory) -> Path:
    """One CLI run on the tiny BERT; the saved folder is what the tests below inspect."""
    out = tmp_path_factory.mktemp("fitted") / "generator"
    args = ["--encoder", str(tiny_bert), "--corpus", str(corpus_file), "--out", str(out)]
    result = CliRunner().invoke(fit_generator_cmd, [*args, *CLI_FAST, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "after" in result.output and "unigram baseline" in result.output
    return out


def _state(folder: Path, cls) -> dict:
    with _quiet():
        return {k: v.clone() for k, v in cls.from_pretrained(folder).state_dict().items()}


def _quiet():
    from diffcse_train.generator.masked_lm import quiet_transformers

    return quiet_transformers()


def test_saved_folder_is_a_complete_masked_lm(fitted, tiny_bert):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    with _quiet():
        model, info = AutoModelForMaskedLM.from_pretrained(fitted, output_loading_info=True)
    assert type(model).__name__ == "BertForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # the decoder is the (frozen) word embedding matrix: tied, and equal to the encoder's
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert decoder.bias is model.cls.predictions.bias
    encoder = _state(tiny_bert, transformers.AutoModel)
    assert torch.equal(decoder.weight, encoder["embeddings.word_embeddings.weight"])
    assert AutoTokenizer.from_pretrained(fitted).get_vocab() == (
        AutoTokenizer.from_pretrained(tiny_bert).get_vocab()
    )
    report = json.loads((fitted / "fit_report.json").read_text())
    assert report["architecture"] == "BertForMaskedLM" and report["steps"] == 40
    assert report["after"]["accuracy"] > report["unigram"]["accuracy"]
    assert report["warm_start"]["perplexity"] < report["before"]["perplexity"]


def test_whole_copy_trains_but_the_word_embeddings(fitted, tiny_bert):
    """The default fit trains every layer of the copy; the word embeddings (the tied
    decoder) stay f's."""
    encoder = _state(tiny_bert, transformers.AutoModel)
    saved = _state(fitted, transformers.AutoModelForMaskedLM)
    changed = {
        k
        for k, v in encoder.items()
        if "pooler" not in k and not torch.equal(saved[f"bert.{k}"], v)
    }
    for layer in range(2):
        assert any(k.startswith(f"encoder.layer.{layer}.") for k in changed), layer
    assert "embeddings.word_embeddings.weight" not in changed


def test_the_trainer_accepts_it_as_a_generator(fitted):
    """The trainer's own check: every weight comes from the checkpoint (no silent re-init)."""
    from transformers import AutoModelForMaskedLM

    from diffcse_train.model import verify_pretrained_weights

    with _quiet():
        model, info = AutoModelForMaskedLM.from_pretrained(fitted, output_loading_info=True)
    assert verify_pretrained_weights(model, info, str(fitted)) > 30


def test_saved_generator_fills_a_mask(fitted):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fitted)
    with _quiet():
        model = AutoModelForMaskedLM.from_pretrained(fitted).eval()
    batch = tok([f"a man is playing a {tok.mask_token} in the park ."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    where = batch["input_ids"][0] == tok.mask_token_id
    predicted = int(logits[0, where].argmax(-1))
    assert predicted not in tok.all_special_ids
    assert tok.decode([predicted]).strip()


def _tiny_rows(tiny_bert):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    masking = Masking.of(tok)
    rows = tok(tiny.corpus(1200)[200:], truncation=True, max_length=32)["input_ids"]
    held_out = masking.mask(
        tok(tiny.corpus(1200)[:200], max_length=32)["input_ids"],
        0.15,
        torch.Generator().manual_seed(5),
        all_to_mask=True,
    )
    return rows, masking, held_out


def test_head_only_fit_lowers_the_mlm_loss_and_keeps_the_encoder_frozen(tiny_bert):
    """unfreeze_top_k=0, in memory, AdamW alone (no warm start): only the head moves, never
    the tied decoder weight, and the held-out loss goes down."""
    with _quiet():
        mlm, fresh = load_encoder_as_mlm(str(tiny_bert))
    assert fresh
    _, head = find_head(mlm)
    rows, masking, held_out = _tiny_rows(tiny_bert)
    settings = FitSettings(**FAST, unfreeze_top_k=0)
    gen = torch.Generator().manual_seed(5)
    cache = collect(mlm, rows, masking, settings, gen, len(rows), progress=False)
    before_state = {k: v.clone() for k, v in mlm.state_dict().items()}
    before = score(mlm, head, [held_out], masking)
    steps = train_head(mlm, head, cache, settings, progress=False)
    after = score(mlm, head, [held_out], masking)
    assert steps == 40
    assert after.perplexity < 0.9 * before.perplexity  # perplexity = exp(mean MLM loss)
    assert after.copy_accuracy > before.copy_accuracy  # unmasked tokens come back more often
    changed = {k for k, v in mlm.state_dict().items() if not torch.equal(v, before_state[k])}
    assert changed and all(k.startswith("cls.predictions.") for k in changed)
    assert "cls.predictions.decoder.weight" not in changed
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    assert not mlm.bert.embeddings.word_embeddings.weight.requires_grad


def test_whole_model_fit_beats_the_head_only_fit(tiny_bert):
    """Same data, same steps: training the encoder too fills masks better than the head
    alone."""
    rows, masking, held_out = _tiny_rows(tiny_bert)
    scores = {}
    for k in (0, None):
        with _quiet():
            mlm, _ = load_encoder_as_mlm(str(tiny_bert))
        _, head = find_head(mlm)
        settings = FitSettings(**FAST, unfreeze_top_k=k, encoder_lr=3e-3)
        gen = torch.Generator().manual_seed(5)
        if k == 0:
            cache = collect(mlm, rows, masking, settings, gen, len(rows), progress=False)
            train_head(mlm, head, cache, settings, progress=False)
        else:
            assert train_masked_lm(mlm, head, rows, masking, settings, gen, progress=False) == 40
            assert not mlm.training  # back in eval mode
        scores[k] = score(mlm, head, [held_out], masking)
    # on the tiny whole-word vocabulary both can fill the same share of 257 held-out masks;
    # the whole-model fit must never fill fewer, and must be strictly surer (perplexity)
    assert scores[None].accuracy >= scores[0].accuracy
    assert scores[None].perplexity < scores[0].perplexity


def test_length_batches_cover_the_sample_once_in_similar_lengths():
    from diffcse_train.generator.loop import length_batches

    rows = [[0] * (1 + i % 7) for i in range(100)]
    settings = FitSettings(batch_size=8)
    batches = length_batches(rows, 50, settings, epoch=0)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 50
    assert all(max(len(rows[i]) for i in b) - min(len(rows[i]) for i in b) <= 1 for b in batches)
    assert batches != length_batches(rows, 50, settings, epoch=1)


def test_unfreeze_top_k_trains_only_the_top_layers(tiny_bert, corpus_file, tmp_path):
    out = tmp_path / "gen"
    s = FitSettings(**{**FAST, "max_steps": 10, "max_sentences": 320}, unfreeze_top_k=1)
    s.min_accuracy_gain = 0.0  # only which weights moved matters here
    fit_generator(str(tiny_bert), str(corpus_file), out, s, progress=False)
    encoder = _state(tiny_bert, transformers.AutoModel)
    saved = _state(out, transformers.AutoModelForMaskedLM)
    changed = {
        k
        for k, v in encoder.items()
        if "pooler" not in k and not torch.equal(saved[f"bert.{k}"], v)
    }
    assert changed and all(k.startswith("encoder.layer.1.") for k in changed)  # the top of 2


def test_roberta_encoder(tiny_roberta, corpus_file, tmp_path):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "gen"
    s = FitSettings(**FAST, min_accuracy_gain=0.0)
    report = fit_generator(str(tiny_roberta), str(corpus_file), out, s, progress=False)
    assert report.architecture == "RobertaForMaskedLM"
    assert report.after.perplexity < report.before.perplexity
    with _quiet():
        model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight


@pytest.fixture(scope="module")
def unpredictable_corpus(tmp_path_factory) -> Path:
    """Words drawn independently at random: no context predicts a masked one."""
    import random

    words = sorted(
        {w for phrase in tiny.SUBJECTS + tiny.VERBS + tiny.OBJECTS for w in phrase.split()}
    )
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("unpredictable") / "random_words.txt"
    path.write_text("\n".join(" ".join(rng.choices(words, k=8)) for _ in range(1000)) + "\n")
    return path


def test_no_better_than_unigram_is_refused_and_nothing_written(
    tiny_bert, unpredictable_corpus, tmp_path
):
    out = tmp_path / "gen"
    settings = FitSettings(**{**FAST, "min_eval_sentences": 400, "max_steps": 20})
    with pytest.raises(GeneratorRefused, match="no better than the unigram baseline") as caught:
        fit_generator(str(tiny_bert), str(unpredictable_corpus), out, settings, progress=False)
    report = caught.value.report
    assert report.steps == 20 and not report.improved
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temporary leftovers either


def test_cli_refusal_exits_non_zero_and_writes_nothing(tiny_bert, corpus_file, tmp_path):
    """Zero training (no warm start, no steps) leaves the head at its initialisation."""
    out = tmp_path / "gen"
    args = ["--encoder", str(tiny_bert), "--corpus", str(corpus_file), "--out", str(out)]
    no_training = ["--no-warm-start", "--epochs", "0", "--quiet"]
    result = CliRunner().invoke(fit_generator_cmd, [*args, *no_training])
    assert result.exit_code == 1
    assert "no better than the unigram baseline" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_inputs_fail_clearly_before_training(tiny_bert, tmp_path):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"a fine line\nthis \xff is not utf-8\n")
    with pytest.raises(DataFormatError, match=r"bad.txt:2: not valid UTF-8"):
        fit_generator(str(tiny_bert), str(corpus), tmp_path / "g1")

    small = tmp_path / "small.txt"
    small.write_text("one sentence .\ntwo sentences .\n")
    with pytest.raises(DataFormatError, match="needs at least"):
        fit_generator(str(tiny_bert), str(small), tmp_path / "g2")

    (tmp_path / "exists").mkdir()
    with pytest.raises(DiffcseError, match="already exists; pass --overwrite"):
        fit_generator(str(tiny_bert), str(small), tmp_path / "exists")

    with pytest.raises(DiffcseError, match=r"--encoder \S*nowhere"):
        fit_generator(str(tmp_path / "nowhere"), str(small), tmp_path / "g3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "exists", "small.txt"]


def test_cuda_without_a_gpu_is_refused_early(tiny_bert, corpus_file, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gen"
    args = ["--encoder", str(tiny_bert), "--corpus", str(corpus_file), "--out", str(out)]
    result = CliRunner().invoke(fit_generator_cmd, [*args, "--device", "cuda", "--quiet"])
    assert result.exit_code == 1
    assert "device cuda was requested but no CUDA GPU is available" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_untied_decoder_is_refused(tiny_bert, tmp_path):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(tiny_bert)
    config.tie_word_embeddings = False
    untied = tmp_path / "untied"
    AutoModel.from_pretrained(tiny_bert, config=config).save_pretrained(untied)
    transformers.AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(untied)
    with pytest.raises(DiffcseError, match="not tied to the word embeddings"), _quiet():
        load_encoder_as_mlm(str(untied))


def test_architecture_without_a_masked_lm_is_refused(tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    folder.mkdir()
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(folder)
    with pytest.raises(DiffcseError, match="no masked-LM class for model type 'gpt2'"):
        load_encoder_as_mlm(str(folder))


# ---------------------------------------------------------------- fit_generator: true


def _train_config(tiny_bert: Path, corpus_file: Path, generator: str, **extra):
    from diffcse_train.config import from_dict, validate

    keys = {"model_name_or_path": str(tiny_bert), "train_file": str(corpus_file)}
    keys |= {"output_dir": "unused", "generator_name_or_path": generator, "fit_generator": True}
    return validate(from_dict(keys | extra))


def test_training_config_fits_a_missing_generator_once(tiny_bert, corpus_file, tmp_path):
    """The demo's one-command path: the first run fits and saves G, later runs reuse it."""
    from diffcse_train.generator import ensure_generator

    out = tmp_path / "generator"
    cfg = _train_config(tiny_bert, corpus_file, str(out))
    ensure_generator(cfg)
    report_file = out / "fit_report.json"
    report = json.loads(report_file.read_text(encoding="utf-8"))
    assert report["after"]["accuracy"] > report["unigram"]["accuracy"]
    assert report["settings"]["max_length"] == cfg.max_seq_length
    stamp = report_file.stat().st_mtime_ns
    ensure_generator(cfg)
    assert report_file.stat().st_mtime_ns == stamp  # reused, not fitted again


def test_train_decides_about_the_generator_and_the_trainer_only_trains(
    tiny_bert, corpus_file, tmp_path
):
    """train() fits a missing G, after the cheap checks; a Trainer built directly never fits
    one: it trains with what exists."""
    from diffcse_train.trainer import Trainer, train

    out, run = tmp_path / "g", tmp_path / "run"
    cfg = _train_config(tiny_bert, corpus_file, str(out), output_dir=str(run))
    with pytest.raises(DiffcseError, match=r"generator_name_or_path .*g: cannot load"):
        Trainer(cfg)
    assert not out.exists()
    run.mkdir()
    (run / "metrics.jsonl").write_text("")  # a busy output_dir fails before any fit
    with pytest.raises(DiffcseError, match="already holds a training run"):
        train(cfg)
    assert not out.exists()


def test_fit_generator_key_is_inert_without_a_generator_augmentation(tiny_bert, corpus_file):
    from diffcse_train.generator import ensure_generator

    cfg = _train_config(tiny_bert, corpus_file, "never/written", augmentation="replace")
    ensure_generator(cfg)
    assert not Path("never/written").exists()


def test_fit_generator_key_refuses_what_it_cannot_do(tiny_bert, corpus_file, tmp_path, monkeypatch):
    from diffcse_train.config import ConfigError
    from diffcse_train.generator import ensure_generator

    with pytest.raises(ConfigError, match="needs generator_name_or_path to be a folder"):
        _train_config(tiny_bert, corpus_file, "builtin:all-MiniLM-L6-v2")
    cfg = _train_config(tiny_bert, corpus_file, str(tmp_path / "g"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(DiffcseError, match="fit it once before starting torchrun"):
        ensure_generator(cfg)
    assert not (tmp_path / "g").exists()


def test_an_unknown_device_name_is_one_sentence():
    from diffcse_runtime.errors import DiffcseError
    from diffcse_train.distributed import pick_device

    with pytest.raises(DiffcseError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        pick_device("gpu")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--lr", "nan"),
        ("--encoder-lr", "inf"),
        ("--mask-ratio", "nan"),
        ("--copy-ratio", "nan"),
        ("--min-accuracy-gain", "nan"),
        ("--seed", "-1"),
        ("--batch-size", "0"),
        ("--lr", "-1e-3"),
    ],
)
def test_cli_refuses_non_finite_or_out_of_range_numbers(tmp_path, option, value):
    """Issue 23, 14: click's FloatRange lets NaN through (NaN compares false); each option's
    range comes from FitSettings and refuses it in one line naming the option."""
    args = ["--encoder", "nowhere", "--corpus", "none.txt", "--out", str(tmp_path / "g")]
    result = CliRunner().invoke(fit_generator_cmd, [*args, option, value])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and option in result.output, result.output
    assert "nowhere" not in result.output  # refused before anything is loaded


@pytest.mark.parametrize(
    ("key", "value"), [("lr", float("nan")), ("eval_fraction", 1.5), ("mask_ratio", float("inf"))]
)
def test_settings_built_in_code_are_range_checked_naming_the_key(tiny_bert, tmp_path, key, value):
    settings = FitSettings(**{**FAST, key: value})
    with pytest.raises(DiffcseError, match=f"'{key}' must be"):
        fit_generator(str(tiny_bert), "builtin:wiki_en", tmp_path / "g", settings)
    assert not (tmp_path / "g").exists()

"""The DiffCSE module: conditional discriminator, gradient flow, frozen generator, the
SimCSE special case, and the generator checks at load time."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from diffcse_runtime.errors import DiffcseError  # noqa: E402
from diffcse_train.config import TrainConfig  # noqa: E402
from diffcse_train.data import Collator  # noqa: E402
from diffcse_train.model import (  # noqa: E402
    ConditionalDiscriminator,
    DiffCSE,
    build_model,
    build_projector,
    rtd_loss,
    verify_pretrained_weights,
)
from diffcse_train.optim import make_optimizer  # noqa: E402
from tests.support import tiny  # noqa: E402


@pytest.fixture(scope="module")
def generator_dir(tiny_bert, tmp_path_factory):
    """A 1-layer masked LM saved with tiny_bert's own tokenizer (same vocabulary)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(3)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    out = tmp_path_factory.mktemp("shared_vocab_mlm")
    BertForMaskedLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def config(tiny_bert, generator_dir=None, **kw) -> TrainConfig:
    values = dict(
        model_name_or_path=str(tiny_bert),
        generator_name_or_path=str(generator_dir) if generator_dir else None,
        train_file="unused",
        output_dir="unused",
        augmentation="mlm" if generator_dir else "replace",
        mask_ratio=0.3,
        lambda_weight=0.5,
    )
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def diffcse(tiny_bert, generator_dir):
    torch.manual_seed(0)
    model, tokenizer = build_model(config(tiny_bert, generator_dir))
    collator = Collator(tokenizer, 32, "mlm", 0.3, seed=0)
    return model, tokenizer, collator


# ---------------------------------------------------------------- conditional discriminator


@pytest.mark.parametrize("style", ["bert", "roberta"])
def test_discriminator_is_conditioned_at_position_0(style, tiny_bert, tiny_roberta):
    from transformers import AutoModel, AutoTokenizer

    folder = tiny_bert if style == "bert" else tiny_roberta
    tok = AutoTokenizer.from_pretrained(folder)
    disc = ConditionalDiscriminator(AutoModel.from_pretrained(folder)).eval()
    enc = tok(tiny.corpus(4), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        own = disc.encoder.embeddings(input_ids=ids)[:, 0]  # post-LayerNorm position 0
        plain = disc.head(disc.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
        same = disc(ids, mask, own)
        gen = torch.Generator().manual_seed(0)  # not the global RNG: other tests move it
        h1, h2 = (torch.randn(4, own.shape[1], generator=gen) for _ in range(2))
        out1, out2 = disc(ids, mask, h1), disc(ids, mask, h2)
        after = disc.head(disc.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
    # replacing position 0 by its own post-LayerNorm embedding changes nothing ...
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)
    # ... any other h changes the logits of every real token, not only position 0 (h enters
    # at the input, so attention carries it everywhere; a token it did not reach would keep
    # bit-identical logits, and a tiny random model moves some by only ~1e-4)
    changed = (out1 - out2).abs().amax(-1) > 1e-7
    assert changed[mask.bool()].all()
    # and the hook is off again outside a conditioned call
    torch.testing.assert_close(after, plain)


def test_rtd_gradients_reach_the_encoder_and_generator_stays_frozen(diffcse):
    model, _, collator = diffcse
    model.train()
    batch = collator(tiny.corpus(8))
    cls, h = model.sentence_views(batch["input_ids"], batch["attention_mask"])
    ids, mask, labels = model.edited_inputs(batch)
    loss_rtd, _ = rtd_loss(model.discriminator(ids, mask, h), labels)
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_rtd, encoder_params + list(model.projector.parameters()))
    assert all(g is not None for g in grads)
    layer_grad = grads[
        [id(p) for p in encoder_params].index(
            id(model.encoder.encoder.layer[0].attention.self.query.weight)
        )
    ]
    assert layer_grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.generator.parameters())
    assert model.generator.training  # the official code's G: dropout on, still frozen


def test_generator_never_changes_during_training(diffcse, tiny_bert, generator_dir):
    model, _, collator = diffcse
    before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    encoder_before = model.encoder.embeddings.word_embeddings.weight.clone()
    optimizer = make_optimizer(model, config(tiny_bert, generator_dir, learning_rate=1e-2))
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.generator.parameters()}
    model.train()
    for i in range(3):
        out = model(collator(tiny.corpus(8, seed=i)))
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in model.generator.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.generator.state_dict().items())
    assert not torch.equal(encoder_before, model.encoder.embeddings.word_embeddings.weight)
    for key in ("loss_rtd", "rtd_acc", "rtd_rep_acc", "rtd_fix_acc"):
        assert key in out


def test_mlm_labels_are_generator_replacements(diffcse):
    model, tokenizer, collator = diffcse
    batch = collator(tiny.corpus(8))
    ids, mask, labels = model.edited_inputs(batch)
    original = batch["input_ids"].repeat(2, 1)
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert (ids[~mask.bool()] == tokenizer.pad_token_id).all()
    real = mask.bool()
    assert torch.equal(labels[real], (ids != original).long()[real])


# ---------------------------------------------------------------- SimCSE special case


def test_lambda_zero_is_simcse_infonce(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    encoder = AutoModel.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    model = DiffCSE(encoder, build_projector("batchnorm", 32), temperature=0.05).train()
    batch = Collator(tok, 32, "none", 0.0, seed=0)(tiny.corpus(6))
    torch.manual_seed(11)
    loss = model(batch)["loss"].item()
    torch.manual_seed(11)  # same dropout masks: recompute the two views
    with torch.no_grad():
        _, h = model.sentence_views(batch["input_ids"], batch["attention_mask"])
    n = 6
    z1, z2 = h[:n].double().tolist(), h[n:].double().tolist()
    assert not torch.allclose(h[:n], h[n:])  # dropout made two different views

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    terms = []
    for i in range(n):
        logits = [cos(z1[i], z2[j]) / 0.05 for j in range(n)]
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(v - top) for v in logits))
        terms.append(log_sum - logits[i])
    assert loss == pytest.approx(sum(terms) / n, rel=1e-5)


# ---------------------------------------------------------------- load-time checks


def test_generator_with_another_vocabulary_is_refused(tiny_bert, tmp_path):
    other = tiny.make_mlm(tmp_path / "roberta_mlm", style="roberta")
    with pytest.raises(DiffcseError, match="uses another vocabulary than the encoder"):
        build_model(config(tiny_bert, other))


def test_generator_weights_are_verified(generator_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForMaskedLM

    model, info = AutoModelForMaskedLM.from_pretrained(generator_dir, output_loading_info=True)
    assert verify_pretrained_weights(model, info, str(generator_dir)) > 10
    with torch.no_grad():  # a re-initialisation after loading must not go unnoticed
        model.bert.encoder.layer[0].output.dense.weight.normal_()
    with pytest.raises(DiffcseError, match="differs from the checkpoint"):
        verify_pretrained_weights(model, info, str(generator_dir))
    partial = tmp_path / "partial"
    shutil.copytree(generator_dir, partial)
    weights = load_file(partial / "model.safetensors")
    dropped = next(k for k in weights if "output.dense.weight" in k)
    del weights[dropped]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    model, info = AutoModelForMaskedLM.from_pretrained(partial, output_loading_info=True)
    with pytest.raises(DiffcseError, match="has no weights for 1 parameters"):
        verify_pretrained_weights(model, info, str(partial))


def test_missing_local_model_folder_is_named(tiny_bert, tmp_path):
    with pytest.raises(DiffcseError, match=r"model_name_or_path .*nowhere: no such folder"):
        build_model(config(tmp_path / "nowhere"))
    with pytest.raises(DiffcseError, match=r"generator_name_or_path .*gone: no such folder"):
        build_model(config(tiny_bert, tmp_path / "gone"))

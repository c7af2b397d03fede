"""Training data: the corpus reader, the seeded order, and the edits (masking, replace,
insert, delete) checked statistically on many real tokenized sentences."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from diffcse_runtime.errors import DataFormatError  # noqa: E402
from diffcse_train.data import (  # noqa: E402
    IGNORE,
    Collator,
    _select,
    delete_tokens,
    epoch_order,
    insert_masks,
    load_corpus,
    mask_tokens,
    replace_tokens,
    special_mask,
)
from tests.support import tiny  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


@pytest.fixture(scope="module")
def tokens(tokenizer):
    """2000 real sentences of different lengths, padded: (ids, attention mask, special)."""
    sents = [s.replace(" a ", " a very small ", i % 3) for i, s in enumerate(tiny.corpus(2000))]
    enc = tokenizer(sents, padding=True, truncation=True, max_length=32, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any(), "the batch should contain padding"
    return ids, mask, special_mask(ids, tokenizer.all_special_ids)


def candidates(tokenizer):
    vocab = torch.arange(len(tokenizer))
    return vocab[~torch.isin(vocab, torch.tensor(tokenizer.all_special_ids))]


# ---------------------------------------------------------------- corpus


def test_corpus_skips_and_counts_empty_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first sentence\n\n   \nsecond one\n\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.sentences == ["first sentence", "second one"]
    assert corpus.empty_lines == 3


def test_corpus_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok line\nfine\ncaf\xe9 latin-1\n")
    with pytest.raises(DataFormatError, match=r"bad\.txt:3: not valid UTF-8.*encoding_errors"):
        load_corpus(str(bad))
    assert load_corpus(str(bad), errors="replace").sentences[2] == "caf\ufffd latin-1"
    with pytest.raises(DataFormatError, match="missing.txt: file not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no sentences"):
        load_corpus(str(empty))


def test_builtin_corpus():
    from diffcse_runtime.errors import DiffcseError

    try:
        corpus = load_corpus("builtin:wiki_en")
    except DiffcseError as exc:
        pytest.skip(str(exc))
    assert len(corpus.sentences) > 10_000 and all(s.strip() for s in corpus.sentences[:100])


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = epoch_order(100, 7, 0), epoch_order(100, 7, 0)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_order(100, 7, 1))
    assert not torch.equal(a, epoch_order(100, 8, 0))


# ---------------------------------------------------------------- masking


def test_mask_tokens_respects_specials_padding_and_ratio(tokenizer, tokens):
    ids, mask, special = tokens
    gen = torch.Generator().manual_seed(0)
    out, selected = mask_tokens(
        ids, mask, special, 0.3, tokenizer.mask_token_id, candidates(tokenizer), gen
    )
    eligible = mask.bool() & ~special
    assert not selected[~eligible].any()
    assert torch.equal(out[~selected], ids[~selected])  # nothing else changes
    n = int(eligible.sum())
    assert n > 15_000
    ratio = selected.sum().item() / n
    assert abs(ratio - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    per_sentence = selected.sum(1).float() / eligible.sum(1).float()
    assert abs(per_sentence.mean().item() - 0.3) < 0.01
    k = int(selected.sum())
    to_mask = (out == tokenizer.mask_token_id) & selected
    kept = (out == ids) & selected
    random = selected & ~to_mask & ~kept
    assert abs(to_mask.sum().item() / k - 0.8) < 0.02
    assert abs(random.sum().item() / k - 0.1) < 0.015
    assert abs(kept.sum().item() / k - 0.1) < 0.015
    assert not torch.isin(out[random], torch.tensor(tokenizer.all_special_ids)).any()


def test_replace_labels_changed_tokens_only(tokenizer, tokens):
    ids, mask, special = tokens
    gen = torch.Generator().manual_seed(1)
    out, labels = replace_tokens(ids, mask, special, 0.3, candidates(tokenizer), gen)
    assert torch.equal(out[special], ids[special])
    assert torch.equal(labels[mask.bool()], (out != ids).long()[mask.bool()])
    assert (labels[~mask.bool()] == IGNORE).all()
    changed = (out != ids).sum().item() / (mask.bool() & ~special).sum().item()
    assert 0.28 < changed < 0.31  # a random token rarely equals the original


def test_delete_labels_the_token_after_each_deletion(tokenizer, tokens):
    ids, mask, special = tokens
    new_ids, new_mask, labels = delete_tokens(
        ids, mask, special, 0.3, tokenizer.pad_token_id, torch.Generator().manual_seed(2)
    )
    # the same seed draws the same selection: rebuild the expected result token by token
    deleted = _select(ids, mask, special, 0.3, torch.Generator().manual_seed(2))
    eligible = mask.bool() & ~special
    assert not deleted[~eligible].any()
    assert abs(deleted.sum().item() / eligible.sum().item() - 0.3) < 0.01
    for i in range(len(ids)):
        want_ids, want_labels, prev = [], [], False
        for t in range(int(mask[i].sum())):
            if deleted[i, t]:
                prev = True
                continue
            want_ids.append(int(ids[i, t]))
            want_labels.append(int(prev))
            prev = False
        real = new_mask[i].bool()
        assert new_ids[i][real].tolist() == want_ids
        assert labels[i][real].tolist() == want_labels
        assert (labels[i][~real] == IGNORE).all()
        assert want_ids[0] == tokenizer.cls_token_id and want_ids[-1] == tokenizer.sep_token_id


def test_insert_masks_marks_exactly_the_inserted_positions(tokenizer, tokens):
    ids, mask, _ = tokens
    gen = torch.Generator().manual_seed(3)
    new_ids, new_mask, inserted = insert_masks(
        ids, mask, 0.3, tokenizer.mask_token_id, tokenizer.pad_token_id, gen, limit=64
    )
    assert (new_ids[inserted] == tokenizer.mask_token_id).all()
    assert not inserted[:, 0].any() and not inserted[~new_mask.bool()].any()
    for i in range(len(ids)):
        original = ids[i][mask[i].bool()]
        assert torch.equal(new_ids[i][new_mask[i].bool() & ~inserted[i]], original)
    slots = (mask.sum(1) - 1).sum().item()
    assert abs(inserted.sum().item() / slots - 0.3) < 0.01
    short = insert_masks(ids, mask, 0.9, tokenizer.mask_token_id, 0, gen, limit=12)[0]
    assert short.shape[1] <= 12


# ---------------------------------------------------------------- collator


def test_collator_builds_two_views_and_is_seeded(tokenizer):
    sents = tiny.corpus(8)
    a = Collator(tokenizer, 32, "mlm", 0.3, seed=5)(sents)
    b = Collator(tokenizer, 32, "mlm", 0.3, seed=5)(sents)
    assert a["input_ids"].shape[0] == 8 and a["aug_input_ids"].shape[0] == 16
    assert all(torch.equal(a[k], b[k]) for k in a)
    fill = a["aug_fill"]
    assert not fill[:, 0].any()  # [CLS] stays
    assert torch.equal(fill, a["aug_attention_mask"].bool() & (torch.arange(fill.shape[1]) > 0))
    # the two views of a sentence are edited independently
    assert not torch.equal(a["aug_input_ids"][:8], a["aug_input_ids"][8:])
    plain = Collator(tokenizer, 32, "none", 0.3, seed=5)(sents)
    assert set(plain) == {"input_ids", "attention_mask"}
    assert plain["input_ids"].shape[1] <= 32

"""Training data: the sentence file, the seeded batch order, and the edits D learns to detect.

The corpus is one sentence per line (SimCSE's wiki1m format), or for supervised SimCSE
rows of sent0, sent1 and optional hard_neg (triplets.py). Each step takes `batch_size`
sentences (or rows) in an order fixed by (seed, epoch), so a run resumed from "epoch e, batch b"
sees exactly the batches an uninterrupted run would. All randomness of the edits comes from
one `torch.Generator` owned by the `Collator`, whose state the checkpoint saves.

Edits (paper Table 4), applied independently to each of the two views of a sentence:
    mlm      mask `mask_ratio` of the non-special tokens (80% [MASK], 10% random, 10% kept)
             and let the frozen generator G fill them; D predicts replaced vs original
    replace  the same selection replaced by random vocabulary tokens: no generator needed
    insert   insert [MASK] before ~`mask_ratio` of the tokens; G fills them; D finds them
    delete   delete `mask_ratio` of the tokens; D predicts for every token whether the token
             before it was deleted: no generator needed
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffcse_runtime import builtin
from diffcse_runtime.errors import DataFormatError
from diffcse_runtime.textio import iter_lines
from diffcse_train.triplets import Triplet

IGNORE = -100  # label of positions the RTD loss skips (padding)


@dataclass
class Corpus:
    sentences: list[str]
    empty_lines: int  # skipped, reported to the user
    source: str


def load_corpus(
    spec: str,
    errors: str = "strict",
    label: str = "train_file",
    replace_hint: str = "set encoding_errors=replace",
) -> Corpus:
    """Read a one-sentence-per-line file (or `builtin:wiki_en`); blank lines are skipped and
    counted. `label` and `replace_hint` name the setting in the caller's terms (config key or
    command-line option), so an error points at what the user typed."""
    if builtin.is_builtin(spec):
        return Corpus(builtin.corpus_sentences(spec), 0, spec)
    sentences, empty = [], 0
    try:
        for _, line in iter_lines(spec, errors=errors):
            if line.strip():
                sentences.append(line)
            else:
                empty += 1
    except DataFormatError as exc:
        msg = str(exc).replace("use --errors replace", replace_hint)
        raise DataFormatError(f"{label} {msg}") from None
    if not sentences:
        raise DataFormatError(f"{label} {spec}: no sentences (the file is empty)")
    return Corpus(sentences, empty, str(spec))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sentence order of one epoch: a permutation that depends only on (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def special_mask(ids: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """True at special tokens ([CLS], [SEP], [PAD], [MASK], ...), never edited."""
    return torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype))


def _select(ids, attention_mask, special, ratio, gen) -> torch.Tensor:
    """Each real, non-special token independently with probability `ratio` (as SimCSE/DiffCSE)."""
    probs = torch.full(ids.shape, float(ratio))
    probs.masked_fill_(special | ~attention_mask.bool(), 0.0)
    return torch.bernoulli(probs, generator=gen).bool()


def mask_tokens(ids, attention_mask, special, ratio, mask_id, candidates, gen):
    """BERT masking: of the selected tokens 80% -> [MASK], 10% -> random token, 10% kept.

    Returns (masked ids, selected). `candidates` are the non-special ids random tokens come from.
    """
    selected = _select(ids, attention_mask, special, ratio, gen)
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=gen).bool() & selected
    to_random = torch.bernoulli(torch.full(ids.shape, 0.5), generator=gen).bool()
    to_random &= selected & ~to_mask
    random_ids = candidates[torch.randint(len(candidates), ids.shape, generator=gen)]
    out = ids.clone()
    out[to_mask] = mask_id
    out[to_random] = random_ids[to_random]
    return out, selected


def replace_tokens(ids, attention_mask, special, ratio, candidates, gen):
    """Replace the selected tokens with random ones; label = token differs from the original."""
    selected = _select(ids, attention_mask, special, ratio, gen)
    random_ids = candidates[torch.randint(len(candidates), ids.shape, generator=gen)]
    out = torch.where(selected, random_ids, ids)
    labels = (out != ids).long().masked_fill(~attention_mask.bool(), IGNORE)
    return out, labels


def pad_rows(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad 1-D rows of different lengths into one [rows, longest] tensor."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def delete_tokens(ids, attention_mask, special, ratio, pad_id, gen):
    """Delete the selected tokens; label 1 on each kept token whose predecessor was deleted."""
    selected = _select(ids, attention_mask, special, ratio, gen)
    prev_deleted = torch.zeros_like(selected)
    prev_deleted[:, 1:] = selected[:, :-1]
    kept = attention_mask.bool() & ~selected
    rows = [ids[i][kept[i]] for i in range(len(ids))]
    labels = [prev_deleted[i][kept[i]].long() for i in range(len(ids))]
    new_ids = pad_rows(rows, pad_id)
    new_mask = pad_rows([torch.ones(len(r), dtype=torch.long) for r in rows], 0)
    return new_ids, new_mask, pad_rows(labels, IGNORE)


def insert_masks(ids, attention_mask, ratio, mask_id, pad_id, gen, limit: int):
    """Insert a [MASK] before each token after [CLS] with probability `ratio`.

    Returns (ids, attention mask, inserted) where `inserted` marks the new positions: the
    generator fills exactly those, and they are D's positive labels. Rows longer than
    `limit` lose tokens before their final one ([SEP]), so they stay within max_seq_length.
    """
    lengths = attention_mask.sum(1).tolist()
    before = torch.bernoulli(torch.full(ids.shape, float(ratio)), generator=gen).bool()
    rows, flags = [], []
    for i, n in enumerate(lengths):
        row, flag = [int(ids[i, 0])], [False]
        for t in range(1, n):
            if before[i, t]:
                row.append(mask_id)
                flag.append(True)
            row.append(int(ids[i, t]))
            flag.append(False)
        if len(row) > limit:
            row, flag = row[: limit - 1] + row[-1:], flag[: limit - 1] + flag[-1:]
        rows.append(torch.tensor(row))
        flags.append(torch.tensor(flag))
    new_ids = pad_rows(rows, pad_id)
    new_mask = pad_rows([torch.ones(len(r), dtype=torch.long) for r in rows], 0)
    inserted = pad_rows([f.long() for f in flags], 0).bool()
    return new_ids, new_mask, inserted


class Collator:
    """Tokenize a list of sentences and build D's edited inputs for both dropout views.

    Output keys: input_ids, attention_mask (B rows); for triplets also pair_input_ids,
    pair_attention_mask (the positives, then the hard negatives); when an augmentation is
    on, also aug_input_ids, aug_attention_mask (2B rows: view 1 of every sentence, then
    view 2; for triplets B rows, sent0's) and
    either aug_labels (known by construction) or, for generator augmentations, aug_fill
    (positions G overwrites; the model derives the labels after G has run).
    """

    def __init__(
        self, tokenizer, max_seq_length: int, augmentation: str, mask_ratio: float, seed: int
    ):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.augmentation = augmentation
        self.mask_ratio = mask_ratio
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        if augmentation in ("mlm", "insert") and tokenizer.mask_token_id is None:
            raise DataFormatError(
                f"augmentation {augmentation!r} needs a tokenizer with a mask token"
            )
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        vocab = torch.arange(len(tokenizer))
        self.candidates = vocab[~torch.isin(vocab, torch.tensor(self.special_ids))]
        self.generator = torch.Generator().manual_seed(seed)

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            sentences,
            max_length=self.max_seq_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def tokenize_triplets(self, rows: list[Triplet]) -> dict[str, torch.Tensor]:
        """sent0 as input_ids (B rows); sent1 then hard_neg as pair_input_ids (B or 2B rows).

        All are tokenized together, so they share one width and the model encodes them in
        one pass, each sentence once.
        """
        texts = [r.sent0 for r in rows] + [r.sent1 for r in rows]
        if rows[0].hard_neg is not None:  # all or none in a file (triplets.load_triplets)
            texts += [r.hard_neg for r in rows]
        enc, n = self.tokenize(texts), len(rows)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        return {
            "input_ids": ids[:n],
            "attention_mask": mask[:n],
            "pair_input_ids": ids[n:],
            "pair_attention_mask": mask[n:],
        }

    def __call__(self, items: list[str] | list[Triplet]) -> dict[str, torch.Tensor]:
        """A batch of sentences (two dropout views, both edited) or of triplets (supervised:
        one view of each sentence; only sent0 is edited for D)."""
        supervised = isinstance(items[0], Triplet)
        batch = self.tokenize_triplets(items) if supervised else self.tokenize(items)
        if self.augmentation == "none":
            return batch
        views = 1 if supervised else 2
        ids = batch["input_ids"].repeat(views, 1)
        mask = batch["attention_mask"].repeat(views, 1)
        special = special_mask(ids, self.special_ids)
        gen, ratio = self.generator, self.mask_ratio
        if self.augmentation == "mlm":
            aug, _ = mask_tokens(ids, mask, special, ratio, self.mask_id, self.candidates, gen)
            fill = mask.bool().clone()
            fill[:, 0] = False  # position 0 stays [CLS]
            batch.update(aug_input_ids=aug, aug_attention_mask=mask, aug_fill=fill)
        elif self.augmentation == "replace":
            aug, labels = replace_tokens(ids, mask, special, ratio, self.candidates, gen)
            batch.update(aug_input_ids=aug, aug_attention_mask=mask, aug_labels=labels)
        elif self.augmentation == "delete":
            aug, aug_mask, labels = delete_tokens(ids, mask, special, ratio, self.pad_id, gen)
            batch.update(aug_input_ids=aug, aug_attention_mask=aug_mask, aug_labels=labels)
        elif self.augmentation == "insert":
            aug, aug_mask, inserted = insert_masks(
                ids, mask, ratio, self.mask_id, self.pad_id, gen, self.max_seq_length
            )
            labels = inserted.long().masked_fill(~aug_mask.bool(), IGNORE)
            batch.update(
                aug_input_ids=aug, aug_attention_mask=aug_mask, aug_fill=inserted, aug_labels=labels
            )
        else:
            raise ValueError(f"unknown augmentation {self.augmentation!r}")
        return batch

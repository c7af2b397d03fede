"""The masked-LM mechanics of fit-generator: masking, the model's hidden states and logits,
its MLM head, loading an encoder as its architecture's masked LM, and scoring.

Above the settings (it returns their `MLMScore`), below the optimisation loop and the
orchestration, which both use it; it imports neither.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from diffcse_runtime import builtin
from diffcse_runtime.errors import DiffcseError, first_line
from diffcse_runtime.remote_code import refuse_custom_code
from diffcse_train.data import mask_tokens, pad_rows, special_mask
from diffcse_train.generator.settings import MLMScore

# ---------------------------------------------------------------- masking


def collate(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id rows into (input_ids, attention_mask)."""
    ids = pad_rows([torch.tensor(r, dtype=torch.long) for r in rows], pad_id)
    return ids, pad_rows([torch.ones(len(r), dtype=torch.long) for r in rows], 0)


def unigram_log_probs(
    rows: list[list[int]], vocab_size: int, special_ids: list[int]
) -> torch.Tensor:
    """Add-one smoothed log frequencies of the non-special tokens in `rows`."""
    flat = torch.tensor([t for row in rows for t in row], dtype=torch.long)
    counts = torch.bincount(flat, minlength=vocab_size)[:vocab_size].double()
    counts[special_ids] = 0
    return torch.log((counts + 1) / (counts.sum() + vocab_size)).float()


@dataclass
class Masking:
    """What masking needs to know about the tokenizer."""

    mask_id: int
    pad_id: int
    special_ids: list[int]
    candidates: torch.Tensor  # non-special ids that random replacements come from

    @classmethod
    def of(cls, tokenizer) -> Masking:
        special_ids = sorted(set(tokenizer.all_special_ids))
        vocab = torch.arange(len(tokenizer))
        return cls(
            mask_id=tokenizer.mask_token_id,
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            special_ids=special_ids,
            candidates=vocab[~torch.isin(vocab, torch.tensor(special_ids))],
        )

    def mask(self, rows, ratio, gen, all_to_mask: bool):
        """(input ids, attention mask, selected positions, original ids at them).

        Training uses BERT's 80/10/10 rule; scoring (`all_to_mask`) replaces every selected
        token with [MASK], so its accuracy is plain fill-mask accuracy.
        """
        ids, attention = collate(rows, self.pad_id)
        special = special_mask(ids, self.special_ids)
        masked, selected = mask_tokens(
            ids, attention, special, ratio, self.mask_id, self.candidates, gen
        )
        if all_to_mask:
            masked = ids.masked_fill(selected, self.mask_id)
        return masked, attention, selected, ids[selected]

    def unmasked(self, ids, attention, selected) -> torch.Tensor:
        """Real, non-special tokens that masking left alone: G should return them unchanged."""
        return attention.bool() & ~selected & ~special_mask(ids, self.special_ids)


# ---------------------------------------------------------------- the model


def model_device(mlm: nn.Module) -> torch.device:
    return next(mlm.parameters()).device


def hidden_states(mlm, ids, attention) -> torch.Tensor:
    """The encoder's last hidden states, on the model's device. Masks are drawn on the CPU
    (one seeded generator, the same edits on every device) and moved here."""
    device = model_device(mlm)
    return mlm.base_model(
        input_ids=ids.to(device), attention_mask=attention.to(device)
    ).last_hidden_state


def masked_logits(mlm, head, ids, attention, selected) -> torch.Tensor:
    """The MLM's logits at the selected positions only: the decoder is the costly part."""
    hidden = hidden_states(mlm, ids, attention)
    return head(hidden[selected.to(hidden.device)])


def top_layers(base: nn.Module, k: int | None) -> list[nn.Module]:
    """The encoder's top k transformer layers (its ModuleList of num_hidden_layers blocks);
    k None: all of them."""
    if k == 0:
        return []
    n = base.config.num_hidden_layers
    stacks = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not stacks:
        raise DiffcseError(f"cannot find the {n} layers of {type(base).__name__} to unfreeze")
    if k is None:
        return list(stacks[0])
    if not 0 <= k <= n:
        raise DiffcseError(f"--unfreeze-top-k must be between 0 and {n} (the encoder's layers)")
    return list(stacks[0][n - k :])


def head_decoder_bias(head: nn.Module) -> torch.Tensor:
    """The output bias (tied between decoder.bias and the head's own `bias` in transformers)."""
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1].bias


# ---------------------------------------------------------------- loading


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report: a new head is expected, and we report it ourselves."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def find_head(mlm: nn.Module) -> tuple[str, nn.Module]:
    """The MLM head: the one child of the masked LM, besides the encoder, that has weights.

    Refuses architectures whose head is not one module with a decoder tied to the input
    word embeddings (e.g. DistilBERT's inline head or ALBERT's factorised one).
    """
    base = mlm.base_model
    heads = [
        (name, child)
        for name, child in mlm.named_children()
        if child is not base and any(True for _ in child.parameters())
    ]
    decoder = mlm.get_output_embeddings()
    arch = type(mlm).__name__
    if len(heads) != 1 or decoder is None:
        raise DiffcseError(
            f"{arch} has no single MLM-head module; fit-generator supports BERT-style heads "
            "(e.g. BERT, RoBERTa, XLM-R, MPNet)"
        )
    name, head = heads[0]
    if not any(m is decoder for m in head.modules()):
        raise DiffcseError(f"{arch}: the output embeddings are not part of its MLM head {name}")
    if decoder.weight is not mlm.get_input_embeddings().weight:
        raise DiffcseError(
            f"{arch}: the MLM decoder is not tied to the word embeddings "
            "(tie_word_embeddings is false in its config); fit-generator needs a tied decoder"
        )
    return name, head


def load_encoder_as_mlm(spec: str) -> tuple[nn.Module, bool]:
    """Load an encoder folder (or `builtin:...`) as its architecture's masked LM.

    Returns (model, fresh_head): fresh_head is True when the folder had no MLM head, so the
    head was newly initialised; False when the folder already is a masked LM.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    path = builtin.model_path(spec)
    refuse_custom_code(path, "--encoder")
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        first = first_line(exc)
        raise DiffcseError(
            f"--encoder {spec}: cannot load a Hugging Face model ({first})"
        ) from None
    if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise DiffcseError(
            f"--encoder {spec}: transformers has no masked-LM class for model type "
            f"{config.model_type!r}, so no generator can be fitted on it"
        )
    with quiet_transformers():
        mlm, info = AutoModelForMaskedLM.from_pretrained(
            str(path), output_loading_info=True, trust_remote_code=False
        )
    head_name, _ = find_head(mlm)
    missing = sorted(info["missing_keys"])
    not_head = [k for k in missing if not k.startswith(head_name + ".")]
    if not_head:
        raise DiffcseError(
            f"--encoder {spec}: the checkpoint has no weights for {len(not_head)} encoder "
            f"parameters (e.g. {not_head[0]}); is this the encoder's folder?"
        )
    return mlm, bool(missing)


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def score(mlm, head, eval_batches, masking: Masking) -> MLMScore:
    correct, nll, total, copied, kept = 0, 0.0, 0, 0, 0
    device = model_device(mlm)
    for ids, attention, selected, labels in eval_batches:
        hidden = hidden_states(mlm, ids, attention)
        logits = head(hidden[selected.to(device)]).float()
        labels = labels.to(device)
        correct += int((logits.argmax(-1) == labels).sum())
        nll += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        total += len(labels)
        unmasked = masking.unmasked(ids, attention, selected).to(device)
        copied += int((head(hidden[unmasked]).argmax(-1) == ids.to(device)[unmasked]).sum())
        kept += int(unmasked.sum())
    return MLMScore(correct / total, math.exp(nll / total), total, copied / max(kept, 1))


def unigram_score(log_probs: torch.Tensor, eval_batches) -> MLMScore:
    labels = torch.cat([b[3] for b in eval_batches])
    accuracy = float((labels == log_probs.argmax()).float().mean())
    return MLMScore(accuracy, math.exp(-float(log_probs[labels].mean())), len(labels))


def check_head_is_the_model(mlm, head, batch) -> None:
    """The fast path (head on selected positions) must equal the model's own forward."""
    ids, attention, selected = (t[:8] for t in batch[:3])  # full logits are large: 8 rows
    with torch.no_grad():
        device = model_device(mlm)
        full = mlm(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        full = full[selected.to(device)]
        fast = masked_logits(mlm, head, ids, attention, selected)
    if not torch.allclose(full, fast, atol=1e-4, rtol=1e-4):
        raise DiffcseError(
            f"{type(mlm).__name__}: its forward is not encoder + head; "
            "fit-generator supports BERT-style masked LMs"
        )

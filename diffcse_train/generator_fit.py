"""Fit a masked-LM generator on a frozen encoder, for encoders with no released MLM sibling.

DiffCSE's MLM-replacement edit needs a frozen masked LM with the encoder's vocabulary. Most
sentence encoders (every sentence-transformers model) ship without one, so this module builds
one: it loads the encoder as `AutoModelForMaskedLM` (its own architecture's MLM class), keeps
every encoder weight frozen, and trains only the MLM head (dense + activation + LayerNorm +
bias; the decoder stays tied to the frozen word embeddings) with standard 15% masking.
Optionally the top k layers train too. DiffCSE takes G's argmax at every position, not only
at the masked ones, so a generator that fails to hand back the unmasked tokens marks them
"replaced" too; the head therefore also learns to reproduce a sample of unmasked tokens
(`copy_ratio`), and the report gives that copy accuracy beside fill-mask accuracy.

The frozen encoder's forward pass is nearly all of the cost, so each training sentence is
encoded once (in no-grad mode) and the head learns from the cached hidden states at the
masked positions: first a closed-form least-squares warm start, then AdamW epochs over the
cache. (With `unfreeze_top_k`, every epoch re-encodes with gradients instead.)

The held-out slice is scored before and after, beside the unigram baseline (predicting
every masked token from the training slice's token frequencies). A head that does not beat
that baseline is refused: nothing is written. The saved folder is a normal masked LM
(config, safetensors, tokenizer, fit_report.json) that is reloaded and checked before it
appears under its final name.

    diffcse-train fit-generator --encoder builtin:all-MiniLM-L6-v2 \
        --corpus builtin:wiki_en --out runs/generator-minilm
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffcse_runtime.atomic import atomic_dir
from diffcse_runtime.errors import DataFormatError, DiffcseError
from diffcse_runtime.textio import ERROR_MODES
from diffcse_train import builtin
from diffcse_train.data import epoch_order, load_corpus, mask_tokens, pad_rows, special_mask

if TYPE_CHECKING:
    from diffcse_train.config import TrainConfig

log = logging.getLogger(__name__)
REPORT_FILE = "fit_report.json"


@dataclass
class FitSettings:
    """Everything that shapes a fit; the CLI's defaults come from here."""

    max_sentences: int | None = 12_000  # training sentences encoded (the time budget); None = all
    epochs: int = 4  # AdamW passes after the warm start (measured on MiniLM: 1 -> 4 raised
    # copy accuracy 72% -> 81% and fill accuracy 8.3% -> 9.0%, for 3 more minutes on 2 cores)
    max_steps: int | None = None  # stop AdamW early; None = all epochs
    batch_size: int = 128
    max_length: int = 32
    warm_start: bool = True  # least-squares initialisation of a new head
    lr: float = 1e-3  # the head
    encoder_lr: float = 1e-4  # the unfrozen top layers, if any
    unfreeze_top_k: int = 0
    mask_ratio: float = 0.15
    # DiffCSE reads G's argmax at every position, so G must also hand back the tokens it was
    # not asked to fill: this fraction of the unmasked tokens is trained to reproduce itself.
    copy_ratio: float = 0.15
    eval_fraction: float = 0.02
    min_eval_sentences: int = 300
    min_accuracy_gain: float = 0.01  # absolute; the head must beat the unigram baseline by this
    seed: int = 0
    errors: str = "strict"  # how to decode bad UTF-8 in the corpus: strict | replace


@dataclass
class MLMScore:
    """Masked-token accuracy and perplexity over the held-out slice's masked positions, and
    how often the argmax at the unmasked positions is the input token (`copy_accuracy`)."""

    accuracy: float
    perplexity: float
    tokens: int
    copy_accuracy: float | None = None


@dataclass
class FitReport:
    encoder: str
    corpus: str
    architecture: str
    train_sentences: int
    eval_sentences: int
    steps: int
    trainable_parameters: int
    unigram: MLMScore
    before: MLMScore  # the new head as initialised (its bias = log unigram frequencies)
    warm_start: MLMScore | None  # after the least-squares warm start, if one ran
    after: MLMScore
    seconds: float
    settings: FitSettings
    out: str | None = None

    @property
    def improved(self) -> bool:
        """Better than the unigram baseline on both accuracy (by the margin) and perplexity."""
        gain = self.after.accuracy - self.unigram.accuracy
        return (
            gain >= self.settings.min_accuracy_gain
            and self.after.perplexity < self.unigram.perplexity
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        rows = [("unigram baseline", self.unigram), ("before", self.before)]
        rows += [("least-squares start", self.warm_start)] if self.warm_start else []
        rows += [("after", self.after)]
        lines = [f"{'held-out tokens':<24}{'masked: accuracy':>17}{'perplexity':>12}{'copy':>8}"]
        for name, r in rows:
            copy = f"{r.copy_accuracy:>8.1%}" if r.copy_accuracy is not None else f"{'-':>8}"
            lines.append(f"{name:<24}{r.accuracy:>17.2%}{r.perplexity:>12.1f}{copy}")
        lines.append("(copy: the argmax at unmasked tokens is the input token)")
        return "\n".join(lines)


class GeneratorRefused(DiffcseError):
    """The fitted head is no better than the unigram baseline; `report` says by how much."""

    def __init__(self, message: str, report: FitReport):
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------- loading


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
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
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffcseError(
            f"--encoder {spec}: cannot load a Hugging Face model ({first})"
        ) from None
    if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise DiffcseError(
            f"--encoder {spec}: transformers has no masked-LM class for model type "
            f"{config.model_type!r}, so no generator can be fitted on it"
        )
    with _quiet_transformers():
        mlm, info = AutoModelForMaskedLM.from_pretrained(str(path), output_loading_info=True)
    head_name, _ = find_head(mlm)
    missing = sorted(info["missing_keys"])
    not_head = [k for k in missing if not k.startswith(head_name + ".")]
    if not_head:
        raise DiffcseError(
            f"--encoder {spec}: the checkpoint has no weights for {len(not_head)} encoder "
            f"parameters (e.g. {not_head[0]}); is this the encoder's folder?"
        )
    return mlm, bool(missing)


def top_layers(base: nn.Module, k: int) -> list[nn.Module]:
    """The encoder's top k transformer layers (its ModuleList of num_hidden_layers blocks)."""
    if k == 0:
        return []
    n = base.config.num_hidden_layers
    stacks = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not stacks:
        raise DiffcseError(f"cannot find the {n} layers of {type(base).__name__} to unfreeze")
    if not 0 <= k <= n:
        raise DiffcseError(f"--unfreeze-top-k must be between 0 and {n} (the encoder's layers)")
    return list(stacks[0][n - k :])


# ---------------------------------------------------------------- data


def read_corpus(spec: str, errors: str = "strict") -> list[str]:
    """One sentence per line (blank lines skipped), or a built-in corpus (`builtin:wiki_en`)."""
    return load_corpus(
        spec, errors, label="--corpus", replace_hint="use --errors replace"
    ).sentences


def split_corpus(sentences: list[str], s: FitSettings) -> tuple[list[str], list[str]]:
    """A seeded (train, held-out) split; held-out is eval_fraction, at least min_eval_sentences."""
    n_eval = max(round(s.eval_fraction * len(sentences)), s.min_eval_sentences)
    if len(sentences) < 2 * n_eval:
        raise DataFormatError(
            f"the corpus has {len(sentences)} sentences; fit-generator needs at least "
            f"{2 * n_eval} ({n_eval} are held out for scoring)"
        )
    order = list(range(len(sentences)))
    random.Random(s.seed).shuffle(order)
    return [sentences[i] for i in order[n_eval:]], [sentences[i] for i in order[:n_eval]]


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


# ---------------------------------------------------------------- fitting

Batch = tuple[torch.Tensor, torch.Tensor]  # (hidden states at masked positions, their ids)


def masked_logits(mlm, head, ids, attention, selected) -> torch.Tensor:
    """The MLM's logits at the selected positions only: the decoder is the costly part."""
    hidden = mlm.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
    return head(hidden[selected])


@torch.no_grad()
def score(mlm, head, eval_batches, masking: Masking) -> MLMScore:
    correct, nll, total, copied, kept = 0, 0.0, 0, 0, 0
    for ids, attention, selected, labels in eval_batches:
        hidden = mlm.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
        logits = head(hidden[selected]).float()
        correct += int((logits.argmax(-1) == labels).sum())
        nll += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        total += len(labels)
        unmasked = masking.unmasked(ids, attention, selected)
        copied += int((head(hidden[unmasked]).argmax(-1) == ids[unmasked]).sum())
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
        full = mlm(input_ids=ids, attention_mask=attention).logits[selected]
        fast = masked_logits(mlm, head, ids, attention, selected)
    if not torch.allclose(full, fast, atol=1e-4, rtol=1e-4):
        raise DiffcseError(
            f"{type(mlm).__name__}: its forward is not encoder + head; "
            "fit-generator supports BERT-style masked LMs"
        )


def encode(mlm, rows, masking: Masking, s: FitSettings, gen, epoch: int) -> Iterator[Batch]:
    """Mask (80/10/10) and encode up to `max_sentences` training rows, one batch at a time."""
    n = len(rows) if s.max_sentences is None else min(len(rows), s.max_sentences)
    order = epoch_order(len(rows), s.seed, epoch)[:n].tolist()
    for start in range(0, n, s.batch_size):
        batch = [rows[i] for i in order[start : start + s.batch_size]]
        ids, attention, selected, labels = masking.mask(batch, s.mask_ratio, gen, all_to_mask=False)
        hidden = mlm.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
        unmasked = masking.unmasked(ids, attention, selected)
        copy = unmasked & (torch.rand(ids.shape, generator=gen) < s.copy_ratio)
        yield torch.cat([hidden[selected], hidden[copy]]), torch.cat([labels, ids[copy]])


def collect(mlm, rows, masking: Masking, s: FitSettings, gen, progress: bool) -> list[Batch]:
    """One no-grad pass of the frozen encoder; its outputs feed the warm start and AdamW."""
    from tqdm.auto import tqdm

    n = len(rows) if s.max_sentences is None else min(len(rows), s.max_sentences)
    batches = encode(mlm, rows, masking, s, gen, epoch=0)
    total = math.ceil(n / s.batch_size)
    with torch.no_grad():
        return list(tqdm(batches, total=total, desc="encoding", unit="batch", disable=not progress))


def head_parts(head: nn.Module, hidden_size: int) -> tuple[nn.Linear, nn.LayerNorm] | None:
    """(dense, LayerNorm) of a BERT-style head (dense -> activation -> LayerNorm -> decoder)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in head.modules() if isinstance(m, nn.LayerNorm)]
    if len(linears) != 2 or len(norms) != 1:
        return None
    if linears[0].weight.shape != (hidden_size, hidden_size):
        return None
    return linears[0], norms[0]


@torch.no_grad()
def least_squares_start(head, parts, batches: list[Batch], embeddings, log_probs) -> float:
    """Initialise a new head in closed form; returns the chosen LayerNorm scale.

    The tied decoder scores token v by the dot product of the head's output with v's
    embedding, so the head's job is to map a hidden state close to its target's embedding.
    A ridge regression gives that linear map from the collected features directly, where
    SGD needs many epochs to find it. The dense layer takes the map, shifted by a constant
    into the activation's near-linear range (GELU/ReLU then pass it through); LayerNorm
    normalises it; its scale is picked by log-likelihood on a tenth of the features held
    in. Scale 0 is a candidate, so the start is never worse there than the unigram bias.
    """
    dense, norm = parts
    x = torch.cat([f for f, _ in batches]).double()
    y = torch.cat([t for _, t in batches])
    n_check = max(1, min(len(y) // 10, 2000))
    x_fit, x_check, y_check = x[n_check:], x[:n_check].float(), y[:n_check]
    mean = x_fit.mean(0)
    x_fit = x_fit - mean
    target = embeddings[y[n_check:]].double()
    target -= target.mean(1, keepdim=True)  # LayerNorm removes each vector's mean anyway
    gram = x_fit.T @ x_fit
    gram += 1e-3 * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype)
    w = torch.linalg.solve(gram, x_fit.T @ target)  # prediction = (h - mean) @ w
    k = 1.0 / float((x_fit @ w).std())
    dense.weight.copy_((k * w).T)
    dense.bias.copy_(6.0 - k * (mean @ w))  # ~N(6, 1) pre-activations: GELU(z) ~ z
    norm.bias.zero_()
    head_bias = head_decoder_bias(head)
    head_bias.copy_(log_probs)
    best = (math.inf, 0.0)
    for scale in [0.0, *torch.logspace(-2, 0.5, 11).tolist()]:
        norm.weight.fill_(scale)
        nll = float(nn.functional.cross_entropy(head(x_check), y_check))
        best = min(best, (nll, scale))
    norm.weight.fill_(best[1])
    return best[1]


def head_decoder_bias(head: nn.Module) -> torch.Tensor:
    """The output bias (tied between decoder.bias and the head's own `bias` in transformers)."""
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1].bias


def prepare_trainable(mlm, head, s: FitSettings) -> list[dict]:
    """Freeze everything but the head (minus the tied decoder weight) and the top k layers.

    The whole model stays in eval mode: the frozen encoder must not apply dropout, and the
    generator is used without dropout in DiffCSE anyway.
    """
    mlm.eval()
    mlm.requires_grad_(False)
    tied = mlm.get_output_embeddings().weight
    head_params = [p for p in head.parameters() if p is not tied]
    for p in head_params:
        p.requires_grad_(True)
    layers = top_layers(mlm.base_model, s.unfreeze_top_k)
    layer_params = [p for layer in layers for p in layer.parameters()]
    for p in layer_params:
        p.requires_grad_(True)
    groups = [{"params": head_params, "lr": s.lr}]
    if layer_params:
        groups.append({"params": layer_params, "lr": s.encoder_lr})
    return groups


def train_head(
    mlm, head, cache: list[Batch], rows, masking: Masking, s: FitSettings, gen, progress: bool
) -> int:
    """AdamW (linear warm-up and decay) for `epochs` passes; returns the number of steps.

    Frozen encoder: each pass visits the cached batches in a seeded order. With top layers
    unfrozen, each pass re-encodes fresh masks with gradients through those layers.
    """
    from tqdm.auto import tqdm

    groups = prepare_trainable(mlm, head, s)
    steps = s.epochs * len(cache)
    if s.max_steps is not None:
        steps = min(steps, s.max_steps)
    if steps == 0:
        return 0
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min((i + 1) / warmup, (steps - i) / max(1, steps - warmup))
    )
    bar = tqdm(total=steps, desc="fit-generator", unit="step", disable=not progress)
    step = 0
    for epoch in range(s.epochs):
        if s.unfreeze_top_k:
            batches = encode(mlm, rows, masking, s, gen, epoch)
        else:
            batches = (cache[i] for i in epoch_order(len(cache), s.seed, epoch).tolist())
        for features, labels in batches:
            loss = nn.functional.cross_entropy(head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            step += 1
            if step == steps:
                bar.close()
                return steps
    bar.close()
    return steps


def save_generator(mlm, tokenizer, out: Path, report: FitReport, overwrite: bool, probe) -> None:
    """Write the masked LM, reload it and check it is the model just trained, then publish."""
    from transformers import AutoModelForMaskedLM

    from diffcse_train.model import verify_pretrained_weights

    with atomic_dir(out, overwrite=overwrite) as tmp:
        mlm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        with _quiet_transformers():
            loaded, info = AutoModelForMaskedLM.from_pretrained(str(tmp), output_loading_info=True)
        if verify_pretrained_weights(loaded, info, str(tmp)) == 0:
            raise DiffcseError(f"{out}: no weights were written; not saved")
        _, loaded_head = find_head(loaded)  # also checks the decoder is still tied
        ids, attention, selected = (t[:8] for t in probe[:3])
        with torch.no_grad():
            want = masked_logits(mlm, find_head(mlm)[1], ids, attention, selected)
            got = masked_logits(loaded.eval(), loaded_head, ids, attention, selected)
        if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
            raise DiffcseError(f"{out}: the reloaded generator predicts differently; not saved")


def fit_generator(
    encoder: str,
    corpus: str,
    out: str | Path | None,
    settings: FitSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> FitReport:
    """Fit an MLM head on the frozen `encoder` over `corpus`; save it to `out` if it is good.

    Raises GeneratorRefused (nothing written) when the head does not beat the unigram
    baseline. With `out=None` nothing is saved (a dry run that only reports).
    """
    s = settings or FitSettings()
    if s.errors not in ERROR_MODES:
        raise DiffcseError(f"errors must be one of {', '.join(ERROR_MODES)}, got {s.errors!r}")
    if out is not None and Path(out).exists() and not overwrite:
        raise DiffcseError(f"{out} already exists; pass --overwrite to replace it")
    started = time.perf_counter()
    torch.manual_seed(s.seed)

    from diffcse_train.model import load_tokenizer

    tokenizer = load_tokenizer(encoder, "--encoder")
    if tokenizer.mask_token_id is None:
        raise DiffcseError(f"--encoder {encoder}: its tokenizer has no mask token")
    mlm, fresh = load_encoder_as_mlm(encoder)
    head_name, head = find_head(mlm)
    embeddings = mlm.get_input_embeddings().weight
    if len(tokenizer) > len(embeddings):
        raise DiffcseError(
            f"--encoder {encoder}: the tokenizer has {len(tokenizer)} tokens but the model "
            f"only {len(embeddings)} embeddings"
        )
    masking = Masking.of(tokenizer)
    top_layers(mlm.base_model, s.unfreeze_top_k)  # a bad k fails now, not after encoding

    train, held_out = split_corpus(read_corpus(corpus, s.errors), s)
    tokenize = lambda texts: tokenizer(texts, truncation=True, max_length=s.max_length)["input_ids"]  # noqa: E731
    rows, eval_rows = tokenize(train), tokenize(held_out)
    log_probs = unigram_log_probs(rows, len(embeddings), masking.special_ids)
    if fresh:  # start at the unigram baseline rather than at a uniform guess
        with torch.no_grad():
            head_decoder_bias(head).copy_(log_probs)
    log.info(
        "%s: %s with %s MLM head %r; %d training sentences (%s encoded), %d held out",
        encoder, type(mlm).__name__, "a new" if fresh else "its existing", head_name,
        len(train), s.max_sentences or "all", len(held_out),
    )  # fmt: skip

    eval_gen = torch.Generator().manual_seed(s.seed + 1)
    eval_batches = [
        masking.mask(eval_rows[i : i + s.batch_size], s.mask_ratio, eval_gen, all_to_mask=True)
        for i in range(0, len(eval_rows), s.batch_size)
    ]
    mlm.eval()
    check_head_is_the_model(mlm, head, eval_batches[0])
    unigram, before = (
        unigram_score(log_probs, eval_batches),
        score(mlm, head, eval_batches, masking),
    )

    gen = torch.Generator().manual_seed(s.seed)
    cache = collect(mlm, rows, masking, s, gen, progress)
    warm = None
    parts = head_parts(head, embeddings.shape[1])
    if fresh and s.warm_start and parts is not None:
        least_squares_start(head, parts, cache, embeddings.detach(), log_probs)
        warm = score(mlm, head, eval_batches, masking)
        log.info("least-squares start: accuracy %.2f%%", 100 * warm.accuracy)
    elif fresh and s.warm_start:
        log.info("%s head is not dense -> LayerNorm -> decoder: no warm start", head_name)
    steps = train_head(mlm, head, cache, rows, masking, s, gen, progress)
    trainable = sum(p.numel() for p in mlm.parameters() if p.requires_grad)
    mlm.eval()
    mlm.requires_grad_(False)
    after = score(mlm, head, eval_batches, masking)
    report = FitReport(
        encoder=str(encoder),
        corpus=str(corpus),
        architecture=type(mlm).__name__,
        train_sentences=min(len(train), s.max_sentences or len(train)),
        eval_sentences=len(held_out),
        steps=steps,
        trainable_parameters=trainable,
        unigram=unigram,
        before=before,
        warm_start=warm,
        after=after,
        seconds=round(time.perf_counter() - started, 1),
        settings=s,
        out=str(out) if out is not None else None,
    )
    if not report.improved:
        raise GeneratorRefused(
            f"the fitted head is no better than the unigram baseline (accuracy {after.accuracy:.2%}"
            f" vs {unigram.accuracy:.2%}, needed +{s.min_accuracy_gain:.0%}; perplexity "
            f"{after.perplexity:.1f} vs {unigram.perplexity:.1f}); nothing was written. "
            "Encode more sentences (--max-sentences), train longer (--epochs) or unfreeze "
            "top layers (--unfreeze-top-k)",
            report,
        )
    if out is not None:
        save_generator(mlm, tokenizer, Path(out), report, overwrite, eval_batches[0])
    return report


# ---------------------------------------------------------------- the training config's key


def ensure_generator(cfg: TrainConfig) -> None:
    """With `fit_generator: true`, fit the generator the config names if it does not exist.

    This is what lets one command run the paper's MLM-replacement path on an encoder that
    has no released masked LM (the offline demo): the fitted folder is reused by later runs
    and by --resume. Under torchrun the processes cannot share one fit: fit it first.
    """
    if not (cfg.fit_generator and cfg.needs_generator):
        return
    out = Path(cfg.generator_name_or_path)
    if out.exists():
        log.info("fit_generator: using the generator already in %s", out)
        return
    from diffcse_train import distributed

    if distributed.launch_env().world_size > 1:
        raise DiffcseError(
            f"fit_generator: {out} does not exist yet; fit it once before starting torchrun: "
            f"diffcse-train fit-generator --encoder {cfg.model_name_or_path} "
            f"--corpus {cfg.train_file} --out {out}"
        )
    log.info(
        "fit_generator: %s does not exist; fitting an MLM head on %s first",
        out,
        cfg.model_name_or_path,
    )
    settings = FitSettings(errors=cfg.encoding_errors, max_length=cfg.max_seq_length)
    report = fit_generator(cfg.model_name_or_path, cfg.train_file, out, settings)
    log.info("%s\nsaved the generator to %s (%.0f s)", report.table(), out, report.seconds)

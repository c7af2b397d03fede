"""Fit a masked-LM generator for an encoder that has no released MLM sibling.

DiffCSE's MLM-replacement edit needs a frozen masked LM G with the encoder's vocabulary.
Most sentence encoders (every sentence-transformers model) ship without one, so this module
builds one: it loads a copy of the encoder as `AutoModelForMaskedLM` (its own architecture's
MLM class, with a new head) and trains that copy as a masked LM on unlabelled sentences. G
is a separate frozen model during DiffCSE training, so nothing keeps its layers equal to the
encoder's: by default the whole copy trains (mlm_fit.py has the optimisation). DiffCSE takes
G's argmax at every position, not only at the masked ones, so a G that fails to hand back
the unmasked tokens marks them "replaced" too: the report gives that copy accuracy beside
fill-mask accuracy.

The held-out slice is scored before and after, beside the unigram baseline (predicting
every masked token from the training slice's token frequencies). A G that does not beat
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

from diffcse_runtime import builtin
from diffcse_runtime.atomic import atomic_dir, check_replaceable
from diffcse_runtime.bounds import bounded, check_bounds
from diffcse_runtime.errors import DataFormatError, DiffcseError, first_line
from diffcse_runtime.ownership import check_not_in_use
from diffcse_runtime.remote_code import refuse_custom_code
from diffcse_runtime.textio import ERROR_MODES
from diffcse_train.data import load_corpus
from diffcse_train.distributed import pick_device
from diffcse_train.mlm_fit import (
    Masking,
    collect,
    head_decoder_bias,
    head_parts,
    hidden_states,
    least_squares_start,
    masked_logits,
    model_device,
    top_layers,
    train_head,
    train_masked_lm,
    unigram_log_probs,
)

if TYPE_CHECKING:
    from diffcse_train.config import TrainConfig

log = logging.getLogger(__name__)
REPORT_FILE = "fit_report.json"
GENERATOR_TOOL = "diffcse-train fit-generator"  # named by the --out folder's manifest
GENERATOR_WHAT = "a generator folder"
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class FitSettings:
    """Everything that shapes a fit; the CLI's defaults come from here."""

    # The default trains the whole copy, one pass over the corpus (see mlm_fit.py).
    max_sentences: int | None = bounded(None, ge=1)  # training sentences per epoch; None = all
    epochs: int = bounded(1, ge=0)
    max_steps: int | None = bounded(None, ge=0)  # stop AdamW early; None = all epochs
    batch_size: int = bounded(64, ge=1)
    max_length: int = bounded(32, ge=4)
    # encoder layers that train: None = all, 0 = head only
    unfreeze_top_k: int | None = bounded(None, ge=0)
    lr: float = bounded(1e-3, gt=0, le=1)  # the head
    # the encoder's trainable part (1e-4: 27.6% fill; 3e-4: 30.6%)
    encoder_lr: float = bounded(3e-4, gt=0, le=1)
    precision: str = "auto"  # autocast while training: auto (bf16 where native) | bf16 | fp32
    warm_start: bool = True  # least-squares initialisation of a new head
    warm_start_sentences: int = bounded(2_000, ge=1)  # encoded for it when the encoder trains too
    # of the training tokens, BERT's 80/10/10 rule
    mask_ratio: float = bounded(0.15, ge=0.01, le=0.9)
    # DiffCSE reads G's argmax at every position, so G must also hand back the tokens it was
    # not asked to fill: this fraction of the unmasked tokens is trained to reproduce itself.
    copy_ratio: float = bounded(0.1, ge=0, le=1)
    # held-out tokens all set to [MASK]: fill-mask accuracy
    eval_mask_ratio: float = bounded(0.15, gt=0, lt=1)
    eval_fraction: float = bounded(0.02, gt=0, lt=0.5)
    min_eval_sentences: int = bounded(300, ge=1)
    # absolute; G must beat the unigram baseline by this
    min_accuracy_gain: float = bounded(0.01, ge=0, le=1)
    seed: int = bounded(0, ge=0, lt=2**32)
    errors: str = "strict"  # how to decode bad UTF-8 in the corpus: strict | replace
    device: str = "auto"  # auto (CUDA where present) | cpu | cuda; masks are drawn on the CPU


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
    cpu_seconds: float | None = None  # this process's CPU time (all threads), for the load

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
    with _quiet_transformers():
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


# ---------------------------------------------------------------- fitting


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


def save_generator(mlm, tokenizer, out: Path, report: FitReport, overwrite: bool, probe) -> None:
    """Write the masked LM, reload it and check it is the model just trained, then publish."""
    from transformers import AutoModelForMaskedLM

    from diffcse_train.model import verify_pretrained_weights

    with atomic_dir(out, overwrite, GENERATOR_TOOL, GENERATOR_WHAT) as tmp:
        mlm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        with _quiet_transformers():
            loaded, info = AutoModelForMaskedLM.from_pretrained(
                str(tmp), output_loading_info=True, trust_remote_code=False
            )
        if verify_pretrained_weights(loaded, info, str(tmp)) == 0:
            raise DiffcseError(f"{out}: no weights were written; not saved")
        _, loaded_head = find_head(loaded)  # also checks the decoder is still tied
        ids, attention, selected = (t[:8] for t in probe[:3])
        with torch.no_grad():
            want = masked_logits(mlm, find_head(mlm)[1], ids, attention, selected)
            got = masked_logits(loaded.eval(), loaded_head, ids, attention, selected)
        if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
            raise DiffcseError(f"{out}: the reloaded generator predicts differently; not saved")


@dataclass
class Loaded:
    """The tokenizer, the masked LM (its head new or its own) and the head module."""

    tokenizer: object
    mlm: nn.Module
    head: nn.Module
    head_name: str
    fresh: bool


@dataclass
class Split:
    """Token rows to train on, the held-out masked batches and the unigram baseline."""

    rows: list[list[int]]
    eval_batches: list[tuple]
    log_probs: torch.Tensor
    n_train: int
    n_eval: int


def check_settings(s: FitSettings, out, overwrite: bool, inputs: tuple = ()) -> None:
    try:  # ranges declared beside each field: NaN and infinities never reach the fit
        check_bounds(s, lambda name: f"setting {name!r}")
    except ValueError as exc:
        raise DiffcseError(str(exc)) from None
    if s.errors not in ERROR_MODES:
        raise DiffcseError(f"errors must be one of {', '.join(ERROR_MODES)}, got {s.errors!r}")
    pick_device(s.device)  # a bad name or a missing GPU fails now, before the corpus is read
    if s.precision not in PRECISIONS:
        raise DiffcseError(f"precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    if out is not None:  # only a generator folder we wrote, never the cwd or an input's
        check_not_in_use(Path(out), inputs)
        try:
            check_replaceable(Path(out), overwrite, GENERATOR_TOOL, GENERATOR_WHAT, inputs)
        except FileExistsError:
            raise DiffcseError(f"{out} already exists; pass --overwrite to replace it") from None


def load(encoder: str, s: FitSettings) -> Loaded:
    """The encoder as its architecture's masked LM, checked before any data is read."""
    from diffcse_train.model import load_tokenizer

    tokenizer = load_tokenizer(encoder, "--encoder")
    if tokenizer.mask_token_id is None:
        raise DiffcseError(f"--encoder {encoder}: its tokenizer has no mask token")
    mlm, fresh = load_encoder_as_mlm(encoder)
    head_name, head = find_head(mlm)
    vocab = len(mlm.get_input_embeddings().weight)
    if len(tokenizer) > vocab:
        raise DiffcseError(
            f"--encoder {encoder}: the tokenizer has {len(tokenizer)} tokens but the model "
            f"only {vocab} embeddings"
        )
    top_layers(mlm.base_model, s.unfreeze_top_k)  # a bad k fails now, not after encoding
    return Loaded(tokenizer, mlm.eval(), head, head_name, fresh)


def tokenize_and_split(corpus: str, model: Loaded, masking: Masking, s: FitSettings) -> Split:
    """Seeded train / held-out split, token rows, fixed held-out masks, unigram frequencies."""
    train, held_out = split_corpus(read_corpus(corpus, s.errors), s)

    def tokenize(texts: list[str]) -> list[list[int]]:
        return model.tokenizer(texts, truncation=True, max_length=s.max_length)["input_ids"]

    rows, eval_rows = tokenize(train), tokenize(held_out)
    vocab = len(model.mlm.get_input_embeddings().weight)
    log_probs = unigram_log_probs(rows, vocab, masking.special_ids)
    eval_gen = torch.Generator().manual_seed(s.seed + 1)
    eval_batches = [
        masking.mask(eval_rows[i : i + s.batch_size], s.eval_mask_ratio, eval_gen, all_to_mask=True)
        for i in range(0, len(eval_rows), s.batch_size)
    ]
    n_train = min(len(train), s.max_sentences or len(train))
    return Split(rows, eval_batches, log_probs, n_train, len(held_out))


def fit(model: Loaded, data: Split, masking: Masking, s: FitSettings, progress: bool):
    """Warm-start a new head, then AdamW; returns (warm-start score or None, steps)."""
    mlm, head = model.mlm, model.head
    gen = torch.Generator().manual_seed(s.seed)
    frozen = s.unfreeze_top_k == 0
    warm_n = data.n_train if frozen else min(data.n_train, s.warm_start_sentences)
    parts = head_parts(head, mlm.get_input_embeddings().weight.shape[1])
    warm, cache = None, []
    if (frozen or (model.fresh and s.warm_start)) and warm_n:
        cache = collect(mlm, data.rows, masking, s, gen, warm_n, progress)
    if model.fresh and s.warm_start and parts is not None:
        embeddings = mlm.get_input_embeddings().weight.detach()
        least_squares_start(head, parts, cache, embeddings, data.log_probs)
        warm = score(mlm, head, data.eval_batches, masking)
        log.info("least-squares start: accuracy %.2f%%", 100 * warm.accuracy)
    elif model.fresh and s.warm_start:
        log.info("%s head is not dense -> LayerNorm -> decoder: no warm start", model.head_name)
    if frozen:
        steps = train_head(mlm, head, cache, s, progress)
    else:
        del cache
        steps = train_masked_lm(mlm, head, data.rows, masking, s, gen, progress)
    return warm, steps


def refuse_unless_improved(report: FitReport) -> None:
    after, unigram, s = report.after, report.unigram, report.settings
    if not report.improved:
        raise GeneratorRefused(
            f"the fitted generator is no better than the unigram baseline (accuracy "
            f"{after.accuracy:.2%} vs {unigram.accuracy:.2%}, needed +{s.min_accuracy_gain:.0%};"
            f" perplexity {after.perplexity:.1f} vs {unigram.perplexity:.1f}); nothing was "
            "written. Train on more sentences (--max-sentences) or longer (--epochs)",
            report,
        )


def fit_generator(
    encoder: str,
    corpus: str,
    out: str | Path | None,
    settings: FitSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> FitReport:
    """Fit a copy of `encoder` as a masked LM over `corpus`; save it to `out` if it is good.

    Raises GeneratorRefused (nothing written) when it does not beat the unigram baseline.
    With `out=None` nothing is saved (a dry run that only reports).
    """
    s = settings or FitSettings()
    check_settings(s, out, overwrite, (encoder, corpus))
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.manual_seed(s.seed)
    model = load(encoder, s)
    masking = Masking.of(model.tokenizer)
    data = tokenize_and_split(corpus, model, masking, s)
    if model.fresh:  # start at the unigram baseline rather than at a uniform guess
        with torch.no_grad():
            head_decoder_bias(model.head).copy_(data.log_probs)
    log.info(
        "%s: %s with %s MLM head %r; %d training sentences, %d held out; training %s",
        encoder, type(model.mlm).__name__, "a new" if model.fresh else "its existing",
        model.head_name, data.n_train, data.n_eval, _what_trains(s),
    )  # fmt: skip
    model.mlm.to(pick_device(s.device))
    check_head_is_the_model(model.mlm, model.head, data.eval_batches[0])
    unigram = unigram_score(data.log_probs, data.eval_batches)
    before = score(model.mlm, model.head, data.eval_batches, masking)
    warm, steps = fit(model, data, masking, s, progress)
    trainable = sum(p.numel() for p in model.mlm.parameters() if p.requires_grad)
    model.mlm.eval().requires_grad_(False)
    after = score(model.mlm, model.head, data.eval_batches, masking)
    model.mlm.cpu()  # saved and re-checked on the CPU
    report = FitReport(
        encoder=str(encoder),
        corpus=str(corpus),
        architecture=type(model.mlm).__name__,
        train_sentences=data.n_train,
        eval_sentences=data.n_eval,
        steps=steps,
        trainable_parameters=trainable,
        unigram=unigram,
        before=before,
        warm_start=warm,
        after=after,
        seconds=round(time.perf_counter() - started, 1),
        cpu_seconds=round(time.process_time() - cpu_started, 1),
        settings=s,
        out=str(out) if out is not None else None,
    )
    refuse_unless_improved(report)
    if out is not None:
        save_generator(
            model.mlm, model.tokenizer, Path(out), report, overwrite, data.eval_batches[0]
        )
    return report


def _what_trains(s: FitSettings) -> str:
    if s.unfreeze_top_k is None:
        return "the whole model but the (tied) word embeddings"
    if s.unfreeze_top_k == 0:
        return "the head only (frozen encoder)"
    return f"the head and the top {s.unfreeze_top_k} layers"


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
        "fit_generator: %s does not exist; fitting a masked LM on %s first",
        out,
        cfg.model_name_or_path,
    )
    settings = FitSettings(
        errors=cfg.encoding_errors, max_length=cfg.max_seq_length, device=cfg.device
    )
    report = fit_generator(cfg.model_name_or_path, cfg.train_file, out, settings)
    log.info("%s\nsaved the generator to %s (%.0f s)", report.table(), out, report.seconds)

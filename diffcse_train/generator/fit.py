"""The top of the generator wing: fit a masked-LM generator for an encoder that has no
released MLM sibling (`fit_generator`), or make sure a training config's one exists
(`ensure_generator`).

DiffCSE's MLM-replacement edit needs a frozen masked LM G with the encoder's vocabulary.
Most sentence encoders (every sentence-transformers model) ship without one, so this module
builds one: it loads a copy of the encoder as `AutoModelForMaskedLM` (its own architecture's
MLM class, with a new head) and trains that copy as a masked LM on unlabelled sentences. G
is a separate frozen model during DiffCSE training, so nothing keeps its layers equal to the
encoder's: by default the whole copy trains (loop.py has the optimisation). DiffCSE takes
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

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffcse_runtime.atomic import atomic_dir, check_replaceable
from diffcse_runtime.bounds import check_bounds
from diffcse_runtime.errors import DataFormatError, DiffcseError
from diffcse_runtime.ownership import check_not_in_use
from diffcse_runtime.textio import ERROR_MODES
from diffcse_train.data import load_corpus
from diffcse_train.distributed import pick_device
from diffcse_train.generator.loop import (
    collect,
    head_parts,
    least_squares_start,
    train_head,
    train_masked_lm,
)
from diffcse_train.generator.masked_lm import (
    Masking,
    check_head_is_the_model,
    find_head,
    head_decoder_bias,
    load_encoder_as_mlm,
    masked_logits,
    quiet_transformers,
    score,
    top_layers,
    unigram_log_probs,
    unigram_score,
)
from diffcse_train.generator.settings import (
    FIT_PRECISIONS,
    FitReport,
    FitSettings,
    GeneratorRefused,
)

if TYPE_CHECKING:
    from diffcse_train.config import TrainConfig

log = logging.getLogger(__name__)
REPORT_FILE = "fit_report.json"
GENERATOR_TOOL = "diffcse-train fit-generator"  # named by the --out folder's manifest
GENERATOR_WHAT = "a generator folder"


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


def save_generator(mlm, tokenizer, out: Path, report: FitReport, overwrite: bool, probe) -> None:
    """Write the masked LM, reload it and check it is the model just trained, then publish."""
    from transformers import AutoModelForMaskedLM

    from diffcse_train.model import verify_pretrained_weights

    with atomic_dir(out, overwrite, GENERATOR_TOOL, GENERATOR_WHAT) as tmp:
        mlm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        with quiet_transformers():
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
    if s.precision not in FIT_PRECISIONS:
        choices = ", ".join(FIT_PRECISIONS)
        raise DiffcseError(f"precision must be one of {choices}, got {s.precision!r}")
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

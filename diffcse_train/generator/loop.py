"""The optimisation loop of fit-generator: train a copy of the encoder as a masked LM.

Above the masked-LM mechanics and the settings, below the orchestration (fit.py).

Two regimes, chosen by `FitSettings.unfreeze_top_k`:

    None (default)  the whole copy trains (every layer, position embeddings, the head): the
                    generator is a separate frozen model in DiffCSE, so nothing ties its
                    layers to the encoder's. Each step masks a fresh batch (BERT's 80/10/10)
                    and back-propagates through the model under bf16 autocast where the CPU
                    has native bf16. Batches group sentences of similar length, so little of
                    the compute goes to padding. The word embeddings stay frozen: they are
                    the tied decoder, and keeping them fixed keeps G's output space on f's
                    vocabulary vectors while halving the optimizer's work.
    k > 0           only the top k layers and the head train (the same loop).
    0               only the head trains, on hidden states of the frozen encoder that are
                    computed once: the cheap fit of earlier versions (~9% fill accuracy on
                    MiniLM).

A new head starts from a closed-form least-squares fit (`least_squares_start`) on a few
thousand encoded sentences, so the first full-model steps do not back-propagate a random
head's noise into the encoder. DiffCSE reads G's argmax at every position, so a sample of
the unmasked tokens (`copy_ratio`) is trained to come back unchanged.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import torch
from torch import nn

from diffcse_train.data import epoch_order
from diffcse_train.generator.masked_lm import (
    Masking,
    head_decoder_bias,
    hidden_states,
    masked_logits,
    model_device,
    top_layers,
)
from diffcse_train.generator.settings import FitSettings
from diffcse_train.precision import autocast, autocast_dtype

Batch = tuple[torch.Tensor, torch.Tensor]  # (hidden states at trained positions, their ids)


# ---------------------------------------------------------------- the head's warm start


def encode(mlm, rows, masking: Masking, s: FitSettings, gen, n: int) -> Iterator[Batch]:
    """Mask (80/10/10) and encode the first `n` rows of a seeded order, one batch at a time:
    the hidden states at the masked positions and at a `copy_ratio` sample of the others."""
    order = epoch_order(len(rows), s.seed, 0)[:n].tolist()
    for start in range(0, n, s.batch_size):
        batch = [rows[i] for i in order[start : start + s.batch_size]]
        ids, attention, selected, labels = masking.mask(batch, s.mask_ratio, gen, all_to_mask=False)
        hidden = hidden_states(mlm, ids, attention)
        copy = copy_positions(masking, ids, attention, selected, s.copy_ratio, gen)
        features = torch.cat([hidden[selected.to(hidden.device)], hidden[copy.to(hidden.device)]])
        yield features, torch.cat([labels, ids[copy]]).to(hidden.device)


def collect(
    mlm, rows, masking: Masking, s: FitSettings, gen, n: int, progress: bool
) -> list[Batch]:
    """One no-grad pass of the (eval-mode) encoder over `n` rows."""
    from tqdm.auto import tqdm

    mlm.eval()
    total = math.ceil(n / s.batch_size)
    batches = encode(mlm, rows, masking, s, gen, n)
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
    gram += (
        1e-3 * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    )
    w = torch.linalg.solve(gram, x_fit.T @ target)  # prediction = (h - mean) @ w
    k = 1.0 / float((x_fit @ w).std())
    dense.weight.copy_((k * w).T)
    dense.bias.copy_(6.0 - k * (mean @ w))  # ~N(6, 1) pre-activations: GELU(z) ~ z
    norm.bias.zero_()
    bias = head_decoder_bias(head)
    bias.copy_(log_probs.to(bias.device))
    best = (math.inf, 0.0)
    for scale in [0.0, *torch.logspace(-2, 0.5, 11).tolist()]:
        norm.weight.fill_(scale)
        nll = float(nn.functional.cross_entropy(head(x_check), y_check))
        best = min(best, (nll, scale))
    norm.weight.fill_(best[1])
    return best[1]


# ---------------------------------------------------------------- AdamW


def trainable_groups(mlm, head, s: FitSettings) -> list[dict]:
    """Freeze everything, then free the head (minus the tied decoder weight) and the encoder
    part `unfreeze_top_k` names; returns AdamW's parameter groups (head at `lr`)."""
    mlm.requires_grad_(False)
    tied = mlm.get_output_embeddings().weight
    head_params = [p for p in head.parameters() if p is not tied]
    if s.unfreeze_top_k is None:  # the whole encoder but the word embeddings (the decoder)
        encoder_params = [p for p in mlm.base_model.parameters() if p is not tied]
    else:
        encoder_params = [
            p for m in top_layers(mlm.base_model, s.unfreeze_top_k) for p in m.parameters()
        ]
    for p in head_params + encoder_params:
        p.requires_grad_(True)
    groups = [{"params": head_params, "lr": s.lr}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": s.encoder_lr})
    return groups


def total_steps(s: FitSettings, per_epoch: int) -> int:
    steps = s.epochs * per_epoch
    return steps if s.max_steps is None else min(steps, s.max_steps)


def optimise(groups, steps: int, batches: Iterator, loss_of: Callable, progress: bool) -> int:
    """AdamW with linear warm-up (5%) and linear decay over `steps`; returns steps taken."""
    from tqdm.auto import tqdm

    if steps == 0:
        return 0
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min((i + 1) / warmup, (steps - i) / max(1, steps - warmup))
    )
    step = 0
    with tqdm(total=steps, desc="fit-generator", unit="step", disable=not progress) as bar:
        for batch in batches:
            loss = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step == steps:
                break
    return step


def train_head(mlm, head, cache: list[Batch], s: FitSettings, progress: bool) -> int:
    """Frozen encoder: AdamW on the head over the cached batches, `epochs` seeded passes."""
    mlm.eval()  # the frozen encoder must not apply dropout to features it never recomputes
    groups = trainable_groups(mlm, head, s)
    order = (cache[i] for e in range(s.epochs) for i in epoch_order(len(cache), s.seed, e).tolist())
    loss_of = lambda batch: nn.functional.cross_entropy(head(batch[0]), batch[1])  # noqa: E731
    return optimise(groups, total_steps(s, len(cache)), order, loss_of, progress)


# ---------------------------------------------------------------- the whole masked LM


def copy_positions(masking: Masking, ids, attention, selected, ratio: float, gen) -> torch.Tensor:
    """A `ratio` sample of the real tokens masking left alone: G must hand them back."""
    keep = masking.unmasked(ids, attention, selected)
    return keep & (torch.rand(ids.shape, generator=gen) < ratio)


def length_batches(rows: list[list[int]], n: int, s: FitSettings, epoch: int) -> list[list[int]]:
    """The epoch's first `n` rows (seeded order) in batches of similar length, shuffled.

    Sorting by length within the epoch's sample leaves little padding, which would
    otherwise be a quarter or more of the compute on sentences cut at max_length.
    """
    sample = epoch_order(len(rows), s.seed, epoch)[:n].tolist()
    rng = random.Random(s.seed * 1_000_003 + epoch)
    sample.sort(key=lambda i: (len(rows[i]), rng.random()))
    batches = [sample[i : i + s.batch_size] for i in range(0, n, s.batch_size)]
    rng.shuffle(batches)
    return batches


def train_masked_lm(mlm, head, rows, masking: Masking, s: FitSettings, gen, progress: bool) -> int:
    """AdamW through the model's trainable part, with fresh 80/10/10 masks every step.

    The loss covers the masked positions and a `copy_ratio` sample of the others, and the
    decoder runs only there. Dropout stays on (train mode), as in BERT's pre-training.
    """
    groups = trainable_groups(mlm, head, s)
    n = len(rows) if s.max_sentences is None else min(len(rows), s.max_sentences)
    device = model_device(mlm)
    dtype = autocast_dtype(s.precision, device)
    batches = (
        [rows[i] for i in batch] for e in range(s.epochs) for batch in length_batches(rows, n, s, e)
    )

    def loss_of(batch: list[list[int]]) -> torch.Tensor:
        ids, attention, selected, labels = masking.mask(batch, s.mask_ratio, gen, all_to_mask=False)
        originals = ids.clone()
        originals[selected] = labels
        trained = selected | copy_positions(
            masking, originals, attention, selected, s.copy_ratio, gen
        )
        with autocast(device, dtype):
            logits = masked_logits(mlm, head, ids, attention, trained)
        return nn.functional.cross_entropy(logits.float(), originals[trained].to(device))

    mlm.train()
    try:
        return optimise(
            groups, total_steps(s, math.ceil(n / s.batch_size)), batches, loss_of, progress
        )
    finally:
        mlm.eval()

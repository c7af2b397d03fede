"""The training losses: InfoNCE (unsupervised and supervised SimCSE) and replaced-token detection.

Unsupervised (SimCSE eq. 4, DiffCSE's L_contrast): row i of the first dropout view must pick
row i of the second view among all second views of the batch.

Supervised (SimCSE eq. 5): row i of the anchors (sent0) must pick its annotated positive
(sent1) among every positive of the batch and, when the file has them, every hard negative
(hard_neg) of the batch:

    l_i = -log  e^{sim(h_i, h_i+)/t} / sum_j ( e^{sim(h_i, h_j+)/t} + e^{sim(h_i, h_j-)/t} )

Both are one cross-entropy over cosine similarities divided by the temperature; they differ
only in which rows are the candidates, so both go through `contrastive_loss`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffcse_train.data import IGNORE

GatherRows = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the losses; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def contrastive_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, first_label: int = 0
) -> torch.Tensor:
    """InfoNCE over in-batch negatives: row i of z1 must pick row first_label + i of z2.

    z2 may hold more rows than z1: under DDP the second views of every rank, gathered
    (distributed.gather_rows), with this rank's rows starting at `first_label`; in the
    supervised loss the positives followed by the hard negatives.
    """
    sim = F.normalize(_upcast(z1), dim=-1) @ F.normalize(_upcast(z2), dim=-1).T
    labels = torch.arange(z1.size(0), device=z1.device) + first_label
    return F.cross_entropy(sim / temperature, labels)


def supervised_contrastive_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    hard_negative: torch.Tensor | None,
    temperature: float,
    gather: GatherRows | None = None,
) -> torch.Tensor:
    """Supervised SimCSE: anchor i against every positive and every hard negative of the batch.

    `gather` (distributed.gather_rows under DDP with gather_negatives) widens the candidates
    to every rank's positives and hard negatives; each rank's block keeps its positives
    first, so this rank's positive i sits at the block's offset + i.
    """
    candidates = positive if hard_negative is None else torch.cat([positive, hard_negative])
    first = 0
    if gather is not None:
        candidates, first = gather(candidates)
    return contrastive_loss(anchor, candidates, temperature, first_label=first)


def rtd_loss(
    logits: torch.Tensor, labels: torch.Tensor, over_padding: bool = True
) -> tuple[torch.Tensor, dict]:
    """Replaced-token detection: 2-way cross-entropy, plus accuracies over real tokens.

    `over_padding` (the official code) averages over all n x len positions, padding counted
    as label 0 ("kept"); without it only real tokens count, which raises the effective
    lambda by the padding fraction (~1.2x at length 32). Accuracies follow the official
    code: overall, on replaced tokens (recall of "replaced") and on kept tokens, real tokens only.
    """
    valid = labels != IGNORE
    if over_padding:
        loss = F.cross_entropy(_upcast(logits).flatten(0, 1), labels.clamp(min=0).flatten())
    else:
        loss = F.cross_entropy(_upcast(logits[valid]), labels[valid])
    with torch.no_grad():
        pred = logits.argmax(-1)
        rep, fix = valid & (labels == 1), valid & (labels == 0)
        nan = torch.tensor(float("nan"), device=logits.device)
        stats = {
            "rtd_acc": (pred == labels)[valid].float().mean(),
            "rtd_rep_acc": (pred[rep] == 1).float().mean() if rep.any() else nan,
            "rtd_fix_acc": (pred[fix] == 0).float().mean() if fix.any() else nan,
            "replaced_frac": rep.sum() / valid.sum(),
        }
    return loss, stats

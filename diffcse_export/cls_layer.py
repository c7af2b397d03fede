"""Run the encoder's last layer for the [CLS] row only: the only row the embedding reads.

In the last layer every other token still serves as a key and a value for [CLS], but its
query, attention output, LayerNorms and feed-forward block are dead work: per token that
is 10 of the layer's 12 d^2 multiply-adds, about 1/7 of a 6-layer encoder. Exporting the
pruned layer makes every variant (fp32, optimized, int8, fp16) that much cheaper without
changing the function: the export's parity gate compares the result with the unpruned
PyTorch model.

Only post-LayerNorm BERT-family layers (BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT: the
module names below, absolute positions) are pruned; any other encoder is exported whole.
"""

from __future__ import annotations

import torch
from torch import nn

CLS_PRUNED = "last layer computed for the [CLS] row only"
PRUNABLE_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


def prunable(encoder: nn.Module) -> bool:
    """True when `encoder` has the BERT layer layout this module re-implements."""
    config = getattr(encoder, "config", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if (
        config is None
        or not layers
        or getattr(config, "model_type", "") not in PRUNABLE_MODEL_TYPES
    ):
        return False
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    last = layers[-1]
    needed = ("attention.self.query", "attention.self.key", "attention.self.value")
    needed += ("attention.output.dense", "attention.output.LayerNorm", "intermediate")
    needed += ("output.dense", "output.LayerNorm")
    names = {name for name, _ in last.named_modules()}
    return all(name in names for name in needed)


class ClsStates(nn.Module):
    """encoder(input_ids, attention_mask) -> last-layer [CLS] state, last layer pruned."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.last = encoder.encoder.layer[-1]
        self.heads = int(encoder.config.num_attention_heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        # hidden_states[-1] is the full last layer: unused, so the exporter drops it.
        states = out.hidden_states[-2]
        return self.cls_layer(states, attention_mask)

    def cls_layer(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last BertLayer in eval mode, with only row 0 as the query."""
        attn = self.last.attention
        batch, seq, dim = states.shape
        head_dim = dim // self.heads
        cls = states[:, :1]
        query = attn.self.query(cls).view(batch, 1, self.heads, head_dim).transpose(1, 2)
        key = attn.self.key(states).view(batch, seq, self.heads, head_dim).transpose(1, 2)
        value = attn.self.value(states).view(batch, seq, self.heads, head_dim).transpose(1, 2)
        scores = torch.matmul(query, key.transpose(-1, -2)) * head_dim**-0.5
        padding = attention_mask[:, None, None, :] == 0
        scores = scores.masked_fill(padding, torch.finfo(scores.dtype).min)
        context = torch.matmul(scores.softmax(dim=-1), value).transpose(1, 2).reshape(batch, dim)
        hidden = attn.output.LayerNorm(attn.output.dense(context) + cls[:, 0])
        ffn = self.last.output.dense(self.last.intermediate(hidden))
        return self.last.output.LayerNorm(ffn + hidden)

"""Projector heads rebuilt from `projector.safetensors`, and BatchNorm folding.

DiffCSE's projector is Linear(d,2d,no bias) -> BatchNorm1d(2d) -> ReLU -> Linear(2d,d,no
bias) -> BatchNorm1d(d, affine=False). In eval mode a BatchNorm is the per-channel affine
map y = (x - mean) * gamma / sqrt(var + eps) + beta, so it folds exactly into the Linear
before it: W' = s * W and b' = s * (b - mean) + beta with s = gamma / sqrt(var + eps).
The folded head is Linear -> ReLU -> Linear, which exports as MatMul/Add/Relu only.

The heads are built from plain torch.nn layers whose parameter names match the keys that
diffcse-train writes (see diffcse_train/checkpoint.py), so export needs no training code.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class Affine(nn.Module):
    """x @ W.T + b written as matmul + add, so the ONNX graph holds MatMul and Add."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight_t) + self.bias


def build_projector(kind: str, dim: int, eps: float = 1e-5) -> nn.Sequential:
    """An eval-mode head whose state_dict keys are those of diffcse-train's projector."""
    if kind == "batchnorm":
        layers = OrderedDict(
            linear1=nn.Linear(dim, 2 * dim, bias=False),
            bn1=nn.BatchNorm1d(2 * dim, eps=eps),
            relu=nn.ReLU(),
            linear2=nn.Linear(2 * dim, dim, bias=False),
            bn2=nn.BatchNorm1d(dim, eps=eps, affine=False),
        )
    elif kind == "tanh":
        layers = OrderedDict(linear1=nn.Linear(dim, dim), tanh=nn.Tanh())
    else:
        raise ValueError(f"no projector module for kind {kind!r}")
    return nn.Sequential(layers).eval()


def fold_linear_batchnorm(linear: nn.Linear | Affine, bn: nn.BatchNorm1d) -> Affine:
    """The Affine equal to bn(linear(x)) in eval mode; computed in float64, stored float32."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    if isinstance(linear, Affine):
        weight, bias = linear.weight_t.t().double(), linear.bias.double()
    else:
        weight = linear.weight.double()
        bias = linear.bias.double() if linear.bias is not None else weight.new_zeros(len(weight))
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    folded_w = weight * scale[:, None]
    folded_b = bias * scale + shift
    return Affine(folded_w.float(), folded_b.float())


def fold_projector(head: nn.Sequential) -> nn.Sequential:
    """A copy of `head` where Linear -> BatchNorm1d pairs become one Affine, Linears Affines."""
    out: OrderedDict[str, nn.Module] = OrderedDict()
    children = list(head.named_children())
    i = 0
    while i < len(children):
        name, layer = children[i]
        follower = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(layer, nn.Linear | Affine) and isinstance(follower, nn.BatchNorm1d):
            out[name] = fold_linear_batchnorm(layer, follower)
            i += 2
            continue
        if isinstance(layer, nn.BatchNorm1d):
            raise ValueError(f"BatchNorm {name!r} does not follow a Linear layer")
        if isinstance(layer, nn.Linear):
            bias = (
                layer.bias if layer.bias is not None else layer.weight.new_zeros(len(layer.weight))
            )
            layer = Affine(layer.weight.detach().clone(), bias.detach().clone())
        out[name] = layer
        i += 1
    return nn.Sequential(out).eval()

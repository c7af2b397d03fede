"""BatchNorm folding: the folded projector is the same function as the unfolded one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from diffcse_export.fold import (  # noqa: E402
    Affine,
    build_projector,
    fold_linear_batchnorm,
    fold_projector,
)


def _randomize_bn(head: torch.nn.Sequential, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, as after training."""
    gen = torch.Generator().manual_seed(seed)
    for module in head.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen))
            module.running_var.copy_(torch.rand(n, generator=gen) * 3 + 0.05)
            if module.affine:
                module.weight.data.copy_(torch.randn(n, generator=gen))
                module.bias.data.copy_(torch.randn(n, generator=gen))


@pytest.mark.parametrize("dim", [8, 32, 384])
def test_folded_batchnorm_projector_equals_unfolded(dim):
    torch.manual_seed(dim)
    head = build_projector("batchnorm", dim)
    _randomize_bn(head, seed=dim)
    folded = fold_projector(head)
    x = torch.randn(64, dim) * 2
    with torch.no_grad():
        expected, actual = head(x), folded(x)
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0), (actual - expected).abs().max()
    kinds = [type(m).__name__ for m in folded.children()]
    assert kinds == ["Affine", "ReLU", "Affine"]


def test_fold_uses_running_statistics_not_batch_statistics():
    """A batch of one row would make batch statistics meaningless; eval stats must be used."""
    head = build_projector("batchnorm", 16)
    _randomize_bn(head)
    x = torch.randn(1, 16)
    with torch.no_grad():
        assert torch.allclose(fold_projector(head)(x), head(x), atol=1e-5)


def test_fold_respects_eps():
    head = build_projector("batchnorm", 8, eps=0.5)
    _randomize_bn(head)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.allclose(fold_projector(head)(x), head(x), atol=1e-5)


def test_tanh_projector_is_kept_as_matmul_add_tanh():
    head = build_projector("tanh", 12)
    folded = fold_projector(head)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.allclose(folded(x), head(x), atol=1e-6)
    assert [type(m).__name__ for m in folded.children()] == ["Affine", "Tanh"]


def test_fold_linear_with_bias_and_affine_bn():
    lin = torch.nn.Linear(6, 4)
    bn = torch.nn.BatchNorm1d(4).eval()
    _randomize_bn(torch.nn.Sequential(bn))
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(fold_linear_batchnorm(lin, bn)(x), bn(lin(x)), atol=1e-5)
    assert isinstance(fold_linear_batchnorm(lin, bn), Affine)


def test_batchnorm_without_running_stats_is_refused():
    bn = torch.nn.BatchNorm1d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        fold_linear_batchnorm(torch.nn.Linear(4, 4), bn)


def test_batchnorm_first_is_refused():
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="does not follow a Linear"):
        fold_projector(head)

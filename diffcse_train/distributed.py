"""Training on several processes (GPUs, machines) with torch.distributed and DDP.

`torchrun` starts one process per GPU and sets WORLD_SIZE, RANK and LOCAL_RANK; `setup()`
reads them and joins the process group (nccl on CUDA, gloo on CPU). Without them there is
one process and every helper here is a no-op, so the trainer has a single code path.

A run on W processes with `batch_size` B per process takes the same optimisation step as
one process with batch W*B (tests/train/test_train_ddp.py checks this to 1e-6):

- data: every rank computes the same epoch order; global batch s is its next W*B entries
  and rank r takes the r-th block of B (`rank_batch`), so the concatenation over ranks is
  the single-process batch, in the same row order.
- negatives: each rank scores its B anchors against the second views of all W*B sentences
  (`gather_rows`, gradients flow back to the rank that owns each row), so the contrastive
  loss has the global batch's in-batch negatives (config key `gather_negatives`).
- BatchNorm: the projector's statistics are taken over the global batch (`SyncBatchNorm`).
- gradients: DDP averages gradients over ranks, so each rank's loss is its share of the
  global loss, scaled so that the mean over ranks is exactly the single-process loss: the
  mean over its own anchors (every rank has B), and for the per-token RTD loss its token
  sum divided by the global token count / W (`token_share`). The backward passes of the
  collectives sum what every rank contributed, as SyncBatchNorm's does, so DDP's average
  is the gradient of the mean over ranks of the per-rank losses.

Checkpoints and evaluation happen on rank 0 (`main_only`); the other ranks wait for it.
Each rank draws its own dropout masks and data edits; `last/` keeps every rank's RNG state,
so a resumed torchrun job continues exactly (with the same number of processes).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from diffcse_runtime.errors import DiffcseError, first_line
from diffcse_train.config import DEVICES

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)  # rank 0 may evaluate or save while the others wait
_owned_group = False  # True when setup() created the process group (teardown() ends it)


class DistributedError(DiffcseError):
    """The torchrun environment is incomplete or the process group cannot start."""


# ---------------------------------------------------------------- environment and group


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or any launcher using its variables) says about this process."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read WORLD_SIZE, RANK and LOCAL_RANK; without WORLD_SIZE this is a single process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return LaunchEnv()
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        shown = ", ".join(f"{k}={env.get(k)!r}" for k in names)
        raise DistributedError(f"torchrun variables must be integers ({shown})") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"inconsistent torchrun variables WORLD_SIZE={world} RANK={rank}")
    if world > 1 and ("RANK" not in env or "MASTER_ADDR" not in env):
        raise DistributedError(
            f"WORLD_SIZE={world} is set but RANK or MASTER_ADDR is not: start multi-process "
            "training with torchrun (see the README), which sets them for every process"
        )
    return LaunchEnv(world, rank, local)


def pick_device(name: str) -> torch.device:
    """auto | cpu | cuda as a torch device; auto takes CUDA where one is present."""
    if name not in DEVICES:
        raise DiffcseError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DiffcseError("device cuda was requested but no CUDA GPU is available")
    return torch.device(name)


def setup(device: torch.device) -> torch.device:
    """Join the process group when torchrun started several processes; return this rank's
    device (cuda:LOCAL_RANK on GPUs). nccl for CUDA, gloo for CPU."""
    global _owned_group
    env = launch_env()
    if env.world_size == 1 or dist.is_initialized():
        return _rank_device(device, local_rank() if dist.is_initialized() else 0)
    device = _rank_device(device, env.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(
            backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None
        )
    except (ValueError, RuntimeError) as exc:
        first = first_line(exc)
        raise DistributedError(f"cannot start the {backend} process group ({first})") from None
    _owned_group = True
    return device


def _rank_device(device: torch.device, local: int) -> torch.device:
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local >= count:
        raise DistributedError(
            f"LOCAL_RANK {local} needs GPU {local}, but this machine shows {count}: "
            "use --nproc_per_node at most the number of GPUs"
        )
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def teardown(clean: bool = True) -> None:
    """Leave the process group if `setup()` created it.

    After a clean run a barrier lets every rank leave together: a gloo rank that tears
    down while a peer still has traffic in flight can abort ("terminate called without an
    active exception"). After an error there is no barrier, which could wait forever.
    """
    global _owned_group
    if _owned_group and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    _owned_group = False


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", rank()))


def is_main() -> bool:
    return rank() == 0


# ---------------------------------------------------------------- rank-0 work


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (pickled)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def main_only(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on rank 0 while the others wait; every rank returns its result.

    A DiffcseError on rank 0 is raised on every rank, so all processes stop with the same
    message instead of the others waiting for a rank that is gone.
    """
    if world_size() == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except DiffcseError as exc:
            error = exc
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def mean_over_ranks(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Average scalar metrics over ranks (one all_reduce); NaN stays NaN."""
    keys = list(values)
    numbers = [v.detach() if isinstance(v, torch.Tensor) else v for v in values.values()]
    flat = torch.tensor([float(v) for v in numbers], dtype=torch.float64)
    if world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else "cpu"
        flat = flat.to(device)
        dist.all_reduce(flat)
        flat = flat.cpu() / world_size()
    return dict(zip(keys, flat.tolist(), strict=True))


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of `params` over ranks, for steps taken outside DDP's wrapper
    (D's warm start trains D alone, calling the model directly)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def _nccl() -> bool:
    return dist.get_backend() == "nccl"


def seed_per_rank(seed: int) -> None:
    """Own dropout masks per rank: the model was built from one seed on every rank, but
    identical masks on all ranks would correlate their views. A no-op in one process."""
    if world_size() > 1:
        torch.manual_seed(seed + 1_000_003 * rank())


# ---------------------------------------------------------------- data


def rank_batch(
    order: torch.Tensor, batch: int, batch_size: int, rank: int, world: int
) -> torch.Tensor:
    """Rank `rank`'s indices of global batch `batch` of an epoch order.

    The global batch is `world * batch_size` consecutive entries of `order` (the same
    permutation on every rank, see data.epoch_order) and rank r takes the r-th block, so the
    ranks' batches, concatenated in rank order, are the single-process batch of that size.
    """
    start = (batch * world + rank) * batch_size
    return order[start : start + batch_size]


# ---------------------------------------------------------------- differentiable collectives


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the summed gradient of its rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.size(0)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss may use every row
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with the matching backward (the gradient summed over ranks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of `x` from every rank in rank order, index of this rank's first row).

    Every rank must pass the same number of rows. Gradients reach the rank that owns a row.
    """
    if world_size() == 1:
        return x, 0
    return _GatherRows.apply(x), rank() * x.size(0)


def token_share(valid: torch.Tensor) -> float:
    """Factor that turns a per-rank token mean into this rank's share of the global mean.

    local mean * local count * W / global count; the mean of these over the W ranks is the
    mean over all tokens of the global batch. 1.0 in one process.
    """
    if world_size() == 1:
        return 1.0
    counts = valid.sum().to(torch.float64).reshape(1)
    local = float(counts)
    dist.all_reduce(counts)
    return local * world_size() / max(float(counts), 1.0)


# ---------------------------------------------------------------- BatchNorm and DDP


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are taken over the global batch of all ranks.

    The same role as torch.nn.SyncBatchNorm, which cannot be used here: it refuses CPU
    tensors and DDP refuses it in CPU modules, so a gloo run (CPU training, the CI test)
    could not use or test it. This one works on every backend from two summed moments:
    the global mean, then the global mean of squared deviations (as BatchNorm computes
    them); running_var keeps the unbiased estimate. Outside training or in one process it
    is exactly nn.BatchNorm, with the same parameters, buffers and state_dict keys.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.tensor(float(xf.numel() // xf.size(1)), dtype=xf.dtype, device=x.device)
        dist.all_reduce(count)
        n = float(count)
        mean = _SumOverRanks.apply(xf.sum(dims)) / n
        centered = xf - mean.view(shape)
        var = _SumOverRanks.apply((centered * centered).sum(dims)) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                m = 1.0 / float(self.num_batches_tracked) if m is None else m
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / max(n - 1, 1.0))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm in `module` for `SyncBatchNorm`, keeping its parameters and
    buffers (the same tensors, so the state_dict keys and the optimizer are unchanged)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, SyncBatchNorm
    ):
        synced = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The module to call in training: `model` itself in one process; under DDP, with
    synchronised BatchNorm, wrapped in DistributedDataParallel (which also makes every rank
    start from rank 0's weights). `model` stays the plain module for saving and evaluation."""
    if world_size() == 1:
        return model
    convert_sync_batchnorm(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)

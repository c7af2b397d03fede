"""Which dtype autocast runs in: one answer for training and for fit-generator.

A precision name means the same everywhere: fp32 is no autocast, bf16 is bfloat16, fp16 is
float16 (CUDA only), and auto is bf16 where the device computes it natively. Each config
offers its own subset: TrainConfig fp32 | fp16 | bf16, FitSettings auto | bf16 | fp32.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            log.warning("precision fp16 needs a CUDA GPU; training in fp32 on %s", device.type)
            return None
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else None  # auto


def native_bf16(device: torch.device) -> bool:
    """CUDA with bf16, or a CPU with AVX512-BF16/AMX (~1.8x faster than fp32 on 2 cores)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast in `dtype` on `device`; no autocast when `dtype` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

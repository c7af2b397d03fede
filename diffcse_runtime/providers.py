"""Why a session is not on the execution provider the user expects, in one WARNING line.

Landing on the CPU silently is the costly failure of a GPU deployment: throughput drops
10-100x and nothing errs. It happens three ways, each with its own fix:
- a provider was asked for that this onnxruntime build lacks (the CPU wheel has no CUDA);
- onnxruntime offers CUDA but could not start it (CUDA/cuDNN libraries, driver, device);
- a CUDA device is present but only the CPU build is importable: `onnxruntime-gpu` is not
  installed, or a plain `onnxruntime` installed after it overwrote its files (README, "GPU").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("diffcse_runtime")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_FIX = (
    "install onnxruntime-gpu without the CPU onnxruntime wheel "
    "(pip uninstall -y onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu; "
    "README: 'GPU install')"
)
_NVIDIA_MARKERS = ("/proc/driver/nvidia/version", "/dev/nvidia0")


def cuda_device_present() -> bool:
    """An NVIDIA driver with a device is visible (no CUDA library is loaded to find out)."""
    return any(Path(marker).exists() for marker in _NVIDIA_MARKERS)


def fallback_reason(requested: Sequence[str], available: Sequence[str], used: Sequence[str]):
    """Why the session does not run on `requested[0]`; None when it does."""
    first = requested[0]
    if used and used[0] == first:
        return None
    running = used[0] if used else "no provider"
    if first not in available:
        fix = f"; {GPU_FIX}" if first == CUDA else ""
        return (
            f"{first} was requested but this onnxruntime build does not offer it "
            f"(it offers {', '.join(available)}); running on {running}{fix}"
        )
    return (
        f"{first} is offered by onnxruntime but could not be started (its CUDA/cuDNN "
        f"libraries, the driver or the device: onnxruntime's own message above says which); "
        f"running on {running}"
    )


def cpu_only_reason(available: Sequence[str]) -> str | None:
    """A CUDA device is present but this onnxruntime offers no CUDA provider; else None."""
    if CUDA in available or not cuda_device_present():
        return None
    return (
        "a CUDA device is present but this onnxruntime build offers only "
        f"{', '.join(available)}, so encoding runs on the CPU; {GPU_FIX}"
    )


def warn(reason: str | None) -> None:
    if reason:
        log.warning("diffcse_runtime: %s", reason)

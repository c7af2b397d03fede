"""A session that is not where the user expects it says why, as one WARNING: CUDA offered by
onnxruntime but the session landed on the CPU, a requested provider this build lacks, and a
CUDA device next to a CPU-only onnxruntime (the clobbered onnxruntime-gpu install)."""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest

from diffcse_runtime import Encoder, providers
from diffcse_runtime.encoder import pick_providers

CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_cuda_offered_but_session_on_cpu_names_the_reason(tiny_model_dir, monkeypatch, caplog):
    """onnxruntime lists CUDA (as onnxruntime-gpu does) but cannot start it here."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [providers.CUDA, providers.CPU])
    assert pick_providers() == [providers.CUDA, providers.CPU]
    with caplog.at_level(logging.WARNING, logger="diffcse_runtime"):
        enc = Encoder(tiny_model_dir)
    assert enc.session.get_providers()[0] == providers.CPU  # this host has no CUDA
    (message,) = [m for m in warnings_of(caplog) if "could not be started" in m]
    assert "CUDAExecutionProvider is offered" in message and "running on CPU" in message


def test_a_requested_provider_missing_from_the_build_is_named(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="diffcse_runtime"):
        enc = Encoder(tiny_model_dir, providers=[providers.CUDA, providers.CPU])
    assert enc.session.get_providers()[0] == providers.CPU
    (message,) = [m for m in warnings_of(caplog) if "was requested" in m]
    assert "does not offer it" in message and "pip install onnxruntime-gpu" in message


def test_cuda_device_with_a_cpu_only_onnxruntime_warns(monkeypatch, caplog):
    monkeypatch.setattr(ort, "get_available_providers", lambda: CPU_ONLY)
    monkeypatch.setattr(providers, "cuda_device_present", lambda: True)
    with caplog.at_level(logging.WARNING, logger="diffcse_runtime"):
        assert pick_providers() == [providers.CPU]
    (message,) = warnings_of(caplog)
    assert "a CUDA device is present" in message and "only AzureExecutionProvider" in message


@pytest.mark.parametrize("explicit", [False, True])
def test_no_warning_where_cpu_is_what_was_asked_or_all_there_is(
    tiny_model_dir, monkeypatch, caplog, explicit
):
    monkeypatch.setattr(providers, "cuda_device_present", lambda: explicit)  # explicit CPU wins
    with caplog.at_level(logging.WARNING, logger="diffcse_runtime"):
        Encoder(tiny_model_dir, providers=[providers.CPU] if explicit else None)
    assert warnings_of(caplog) == []

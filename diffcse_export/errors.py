"""The exceptions export raises: one sentence each, naming the folder, file or option."""

from __future__ import annotations

from typing import Any

from diffcse_runtime.errors import DiffcseError, first_line

__all__ = ["ExportError", "ValidationError", "first_line"]


class ExportError(DiffcseError):
    """The checkpoint, the output path or an option is unusable; nothing was written."""


class ValidationError(ExportError):
    """An exported graph failed the numeric or STS parity gate; nothing was written.

    `reports` holds every variant's measurements, so the caller can still print the table.
    """

    def __init__(self, message: str, reports: list[Any]) -> None:
        super().__init__(message)
        self.reports = reports

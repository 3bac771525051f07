"""Errors anomap raises. Each message names the offending path (when there is one) and the fix."""

from __future__ import annotations

from pathlib import Path


class AnomapError(Exception):
    """Base class: the CLI prints these on one line without a traceback."""

    def __init__(self, problem: str, *, path: str | Path | None = None, fix: str | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.fix = fix
        parts = []
        if self.path is not None:
            parts.append(f"{self.path}: ")
        parts.append(problem)
        if fix and not problem.rstrip().endswith((".", "!", "?")):
            parts.append(".")
        if fix:
            parts.append(f" Fix: {fix}")
        super().__init__("".join(parts))


class DataError(AnomapError):
    """A dataset folder is missing, empty or laid out wrongly; a mask does not fit its image."""


class ImageError(DataError):
    """An image cannot be decoded, is truncated, or is unusable (too small, wrong mode)."""


class ConfigError(AnomapError):
    """An unknown or invalid configuration key or value."""


class CheckpointError(AnomapError):
    """A checkpoint file is missing, truncated, foreign or incompatible."""


class NotFittedError(AnomapError):
    """A detector was used before `fit` or `load`."""


class ExportError(AnomapError):
    """An export could not be written, or its parity check failed."""

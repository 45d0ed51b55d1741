"""Errors about input data; every message names the offending file."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)

"""Errors about input data; every message names the offending file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class DataProblems(DataError):
    """Several problems found in one pass over a dataset's files.

    The message names the first file and counts the others; ``errors`` holds them
    all, so a checker can list every problem instead of stopping at the first.
    ``partial`` is, when the reader could build it, the dataset of the samples that
    had no problem (uncached), so a checker can go on decoding those.
    """

    def __init__(self, errors: list[DataError], partial: Any = None):
        if not errors:
            raise ValueError("DataProblems needs at least one DataError")
        self.errors = list(errors)
        self.partial = partial
        first, more = self.errors[0], len(self.errors) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        super().__init__(first.path, first.problem + suffix)


def raise_problems(errors: list[DataError], partial: Callable[[], Any] | None = None) -> None:
    """Raise nothing, or a :class:`DataProblems` holding every error.

    ``partial`` builds the dataset of the good samples; it is only called when there
    are errors, and a DataError while building it just leaves ``partial`` unset.
    A single error without a partial dataset is raised as itself.
    """
    if not errors:
        return
    built = None
    if partial is not None:
        try:
            built = partial()
        except DataError:
            built = None
    if len(errors) == 1 and built is None:
        raise errors[0]
    raise DataProblems(errors, built)

"""Fixtures for the models tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread() -> Iterator[None]:
    """Run these tiny models on one thread.

    At this size a second thread buys little, and on a shared 2-core machine
    OpenMP threads waiting for each other at every layer can slow a test a
    hundredfold when another process holds a core.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

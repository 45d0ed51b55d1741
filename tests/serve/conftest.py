"""Fixtures of the service tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from serve_testkit import LiveServer  # noqa: E402


@pytest.fixture
def start_server(tmp_path):
    started: list[LiveServer] = []

    def start(registry: Path, *args: str) -> LiveServer:
        server = LiveServer(registry, *args, log=tmp_path / f"serve-{len(started)}.log")
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()

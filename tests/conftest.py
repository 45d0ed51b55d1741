"""Shared fixtures: tiny real datasets cut from the embedded CamVid sample, and a fake clock."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from everseg.samples import camvid_mini

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Two cores: torch's default of one thread per core is right, but keep it explicit so
# tests don't oversubscribe when a developer runs them beside other work.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def _write_tiny_folder(dst: Path, n_train: int, n_test: int, size: tuple[int, int]) -> Path:
    src = camvid_mini()
    h, w = size
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    train = (src / "train.txt").read_text().split()
    test = (src / "test.txt").read_text().split()
    picks = {"train": train[:: max(1, len(train) // n_train)][:n_train],
             "test": test[:: max(1, len(test) // n_test)][:n_test]}
    for split, stems in picks.items():
        for s in stems:
            Image.open(src / "images" / f"{s}.jpg").resize((w, h), Image.BILINEAR).save(
                dst / "images" / f"{s}.png")
            Image.open(src / "masks" / f"{s}.png").resize((w, h), Image.NEAREST).save(
                dst / "masks" / f"{s}.png")
        (dst / f"{split}.txt").write_text("\n".join(stems) + "\n")
    (dst / "classes.txt").write_text((src / "classes.txt").read_text())
    return dst


@pytest.fixture(scope="session")
def tiny_camvid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder-format dataset: 8 train + 4 test real CamVid images at 64x80, 11 classes."""
    return _write_tiny_folder(tmp_path_factory.mktemp("tiny") / "camvid", 8, 4, (64, 80))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


class FakeClock:
    """``time.perf_counter`` under a test's control: work takes exactly the seconds the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", lambda: clock.now)
    return clock

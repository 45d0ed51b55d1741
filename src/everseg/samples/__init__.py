"""Small real datasets shipped inside the package, for the demo and for trying things out."""

from __future__ import annotations

from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent


def camvid_mini() -> Path:
    """Folder-format CamVid sample: 60 train + 20 test images at 240x180 (see its README.md)."""
    return SAMPLES_DIR / "camvid-mini"

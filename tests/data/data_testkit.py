"""Helpers for the data tests (file writers and the layouts of each dataset kind).

Kept out of conftest.py so test modules can import them by a name no other test
folder uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

from everseg.data.cityscapes import CITYSCAPES_LABEL_IDS

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CAMVID = SHARED_DATA / "camvid"
ISBI = SHARED_DATA / "isbi-em"

CROP = (80, 80, 30, 40)  # y, x, height, width: a 40x30 (WxH) crop of a 240x180 image, several classes
# From the embedded sample (src/everseg/samples/camvid-mini), so the data tests need nothing else.
CAMVID_STEMS = ("0006R0_f01710", "0016E5_00930", "0016E5_04680", "0016E5_07860")
ISBI_STEMS = ("0", "1", "2", "10")
CAMVID_NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                "Car", "Pedestrian", "Bicyclist")


def need(path: Path, why: str) -> Path:
    """``path`` of the shared real data; a missing one skips the test with the reason it needs it
    (shown in the summary: pytest runs with -rs)."""
    if not path.exists():
        pytest.skip(f"needs {path} ({why}); it is not there: put ../shared/data beside the project")
    return path


def crop(arr: np.ndarray) -> np.ndarray:
    y, x, h, w = CROP
    return np.ascontiguousarray(arr[y:y + h, x:x + w])


def save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def save_palette_png(path: Path, ids: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> Path:
    """A "P" mode PNG whose indices are ``ids`` (how VOC stores its masks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8), mode="P")
    flat = [c for rgb in palette for c in rgb]
    img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(path)
    return path


def build_folder(root: Path, pairs: Sequence[tuple[str, np.ndarray, np.ndarray]],
                 classes: str, *, yaml_text: str | None = None,
                 lists: dict[str, str] | None = None, image_ext: str = ".png") -> Path:
    """The generic folder layout: images/, masks/, classes.txt (+ everseg.yaml, split lists)."""
    for stem, img, mask in pairs:
        save(root / "images" / f"{stem}{image_ext}", img)
        save(root / "masks" / f"{stem}.png", mask)
    (root / "classes.txt").write_text(classes)
    if yaml_text is not None:
        (root / "everseg.yaml").write_text(yaml_text)
    for name, text in (lists or {}).items():
        (root / f"{name}.txt").write_text(text)
    return root


def voc_ids(camvid_ids: np.ndarray) -> np.ndarray:
    """CamVid ids 0..10 reused as VOC ids 0..10; unlabelled (11) becomes the 255 border."""
    out = camvid_ids.copy()
    out[out == 11] = 255
    return out


TRAIN_TO_LABEL_ID = {}
for _lid, _name, _tid in CITYSCAPES_LABEL_IDS:
    TRAIN_TO_LABEL_ID.setdefault(_tid, _lid)


def cityscapes_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids -> original label ids; ignore pixels get ids 4 (static) and 9 (parking)."""
    out = np.zeros_like(train_ids)
    for t in range(19):
        out[train_ids == t] = TRAIN_TO_LABEL_ID[t]
    ign = train_ids == 255
    out[ign] = 4
    out[ign & (np.arange(train_ids.shape[1])[None, :] % 2 == 0)] = 9
    return out


def camvid_as_train_ids(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[out == 11] = 255
    return out

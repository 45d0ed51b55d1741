"""Fixtures for the data tests: small crops of real CamVid and ISBI-EM images, written
out in the real on-disk layout of each dataset kind (built once per session in a tmp dir).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

# The helpers live in data_testkit.py beside this file; make them importable under any
# pytest import mode (the default "prepend" mode already does this, "importlib" does not).
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from data_testkit import (CAMVID, CAMVID_NAMES, CAMVID_STEMS, ISBI, ISBI_STEMS, build_folder,
                          camvid_as_train_ids, cityscapes_label_ids, crop, need, save,
                          save_palette_png, voc_ids)
from everseg.data.voc import VOC_PALETTE, voc_colormap
from everseg.samples import camvid_mini

@pytest.fixture(scope="session")
def camvid_crops() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(stem, RGB image 30x40x3, raw CamVid ids 30x40 incl. 11 = unlabelled) from the real
    images of the embedded sample (which stores unlabelled as 255, SegNet's files as 11)."""
    sample = camvid_mini()
    out = []
    for stem in CAMVID_STEMS:
        img = np.asarray(Image.open(sample / "images" / f"{stem}.jpg").convert("RGB"))
        mask = np.array(Image.open(sample / "masks" / f"{stem}.png"))
        mask[mask == 255] = 11
        out.append((stem, crop(img), crop(mask)))
    return out


@pytest.fixture(scope="session")
def isbi_crops() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(stem, grayscale 30x40, 0/255 mask 30x40) from real ISBI-EM slices."""
    need(ISBI, "real 8-bit grayscale EM slices with 0/255 membrane masks, as distributed; not embedded")
    out = []
    for stem in ISBI_STEMS:
        img = np.asarray(Image.open(ISBI / "images" / f"{stem}.png"))
        mask = np.asarray(Image.open(ISBI / "masks" / f"{stem}.png"))
        out.append((stem, crop(img), crop(mask)))
    return out


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """``make_folder(name, pairs, classes, yaml_text=..., lists=..., image_ext=...)`` -> root."""
    def make(name: str, pairs, classes: str, **kw) -> Path:
        return build_folder(tmp_path / name, pairs, classes, **kw)
    return make


@pytest.fixture(scope="session")
def isbi_folder(tmp_path_factory, isbi_crops) -> Path:
    """ISBI-EM crops in the folder format: 0/255 masks, classes.txt with 2 names (messy spacing)."""
    root = tmp_path_factory.mktemp("isbi")
    return build_folder(root, isbi_crops, "\nmembrane  \n cell\t\n\n")


@pytest.fixture(scope="session")
def camvid_folder(tmp_path_factory, camvid_crops) -> Path:
    """CamVid crops in the folder format with split lists; 11 declared as an ignore value."""
    root = tmp_path_factory.mktemp("camvid_folder")
    stems = [s for s, _, _ in camvid_crops]
    return build_folder(root, camvid_crops, "\n".join(CAMVID_NAMES) + "\n",
                        yaml_text="ignore_values: [11, 255]\ngroup: '^([^_]+)_'\n",
                        lists={"train": "\n".join(stems[:3]) + "\n", "val": stems[3] + ".png\n"})


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory, camvid_crops) -> Path:
    """``<root>/VOCdevkit/VOC2012`` with JPEGs, palette PNG masks, split lists and an SBD aug set."""
    root = tmp_path_factory.mktemp("voc")
    voc = root / "VOCdevkit" / "VOC2012"
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    palette = voc_colormap(256)
    names = [f"2007_{i:06d}" for i in range(len(camvid_crops))]
    for name, (_, img, mask) in zip(names, camvid_crops):
        save(voc / "JPEGImages" / f"{name}.jpg", img, quality=95)
        save_palette_png(voc / "SegmentationClass" / f"{name}.png", voc_ids(mask), palette)
    (seg / "train.txt").write_text("\n".join(names[:3]) + "\n")
    (seg / "val.txt").write_text(names[3] + "\n")
    (seg / "trainval.txt").write_text("\n".join(names) + "\n")
    # SBD-augmented set: grayscale id masks in SegmentationClassAug, pair-format list.
    aug_names = names[:3] + ["2008_000001"]
    save(voc / "JPEGImages" / "2008_000001.jpg", camvid_crops[0][1][:, ::-1].copy(), quality=95)
    for name, (_, _, mask) in zip(aug_names, camvid_crops[:3] + [camvid_crops[0]]):
        ids = voc_ids(mask) if name != "2008_000001" else voc_ids(mask)[:, ::-1].copy()
        save(voc / "SegmentationClassAug" / f"{name}.png", ids)
    (seg / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in aug_names))
    assert VOC_PALETTE[1] == (128, 0, 0)
    return root


@pytest.fixture(scope="session")
def cityscapes_root(tmp_path_factory, camvid_crops) -> Path:
    """leftImg8bit/ + gtFine/ (labelIds only) for train (2 cities) and val (1 city)."""
    root = tmp_path_factory.mktemp("cityscapes")
    where = [("train", "aachen", 0), ("train", "aachen", 1), ("train", "bochum", 2), ("val", "lindau", 3)]
    for split, city, i in where:
        _, img, mask = camvid_crops[i]
        base = f"{city}_{i:06d}_000019"
        save(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", img)
        save(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png",
             cityscapes_label_ids(camvid_as_train_ids(mask)))
    (root / "gtFine" / "test" / "berlin").mkdir(parents=True)
    (root / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    return root


@pytest.fixture(scope="session")
def ade_root(tmp_path_factory, camvid_crops) -> Path:
    """``<root>/ADEChallengeData2016`` with images/ and zero-based annotations/ (0 = unlabelled)."""
    root = tmp_path_factory.mktemp("ade")
    base = root / "ADEChallengeData2016"
    for split, prefix, idx in (("training", "ADE_train", (0, 1, 2)), ("validation", "ADE_val", (3,))):
        for n, i in enumerate(idx, 1):
            _, img, mask = camvid_crops[i]
            ann = mask.astype(np.uint8) + 1  # class k stored as k + 1 ...
            ann[mask == 11] = 0  # ... and unlabelled as 0
            ann[0, 0] = 150  # the last class (flag) appears too
            save(base / "images" / split / f"{prefix}_{n:08d}.jpg", img, quality=95)
            save(base / "annotations" / split / f"{prefix}_{n:08d}.png", ann)
    return root

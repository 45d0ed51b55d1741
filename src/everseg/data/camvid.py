"""CamVid, 11 classes, in the SegNet layout (``train/`` + ``trainannot/`` etc.).

Labels are grayscale class ids 0..10; 11 is "Unlabelled" and becomes ignore (255).
File names start with the video sequence (0001TP, 0006R0, 0016E5, Seq05VD),
kept as ``Sample.group`` so domain splits can use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from everseg.data.dataset import Sample, SegmentationDataset
from everseg.data.errors import DataError
from everseg.data.labelspace import LabelSpace
from everseg.data.masks import MaskMapping

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
                  "Fence", "Car", "Pedestrian", "Bicyclist")
# The colours of the original CamVid/SegNet visualisation.
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128),
                  (60, 40, 222), (128, 128, 0), (192, 128, 128), (64, 64, 128),
                  (64, 0, 128), (64, 64, 0), (0, 128, 192))
CAMVID_LABELS = LabelSpace(names=CAMVID_CLASSES, palette=CAMVID_PALETTE)
CAMVID_SPLITS = ("train", "val", "test")


def camvid_sequence(stem: str) -> str:
    return stem.split("_")[0]


def _samples_from_list(root: Path, split: str) -> list[Sample]:
    listing = root / f"{split}.txt"
    samples = []
    for lineno, line in enumerate(listing.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(listing, f"line {lineno}: expected 'image mask', got {line!r}")
        # Lines look like /SegNet/CamVid/train/X.png: keep the last two path parts.
        img, mask = (root / Path(p).parent.name / Path(p).name for p in parts)
        samples.append(Sample(img, mask, img.stem, camvid_sequence(img.stem)))
    return samples


def _samples_from_folders(root: Path, split: str) -> list[Sample]:
    img_dir, mask_dir = root / split, root / f"{split}annot"
    if not img_dir.is_dir():
        raise DataError(img_dir, f"CamVid split folder missing (expected {split}/ and {split}annot/)")
    samples = []
    for img in sorted(img_dir.glob("*.png")):
        mask = mask_dir / img.name
        if not mask.is_file():
            raise DataError(img, f"has no mask (looked for {mask})")
        samples.append(Sample(img, mask, img.stem, camvid_sequence(img.stem)))
    return samples


def load_camvid(root: str | Path, split: str = "train", **dataset_kwargs: Any) -> SegmentationDataset:
    """CamVid ``split`` ("train", "val", "test", or "trainval") from the SegNet layout at ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "CamVid folder does not exist")
    splits = ("train", "val") if split == "trainval" else (split,)
    samples: list[Sample] = []
    for s in splits:
        if s not in CAMVID_SPLITS:
            raise ValueError(f"unknown CamVid split {s!r}; choose from {CAMVID_SPLITS + ('trainval',)}")
        found = (_samples_from_list if (root / f"{s}.txt").is_file() else _samples_from_folders)(root, s)
        missing = [x.image for x in found if not x.image.is_file()] + [
            x.mask for x in found if x.mask is not None and not x.mask.is_file()]
        if missing:
            raise DataError(missing[0], f"listed in {s}.txt but missing ({len(missing)} files missing)")
        samples += found
    mapping = MaskMapping.identity(len(CAMVID_CLASSES), ignore=(11, 255))
    return SegmentationDataset(samples, CAMVID_LABELS, mapping, name=f"camvid/{split}", **dataset_kwargs)

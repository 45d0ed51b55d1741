"""Pascal VOC 2012 segmentation (21 classes), optionally with the SBD "train_aug" set.

Layout, as the official tarball unpacks::

    VOCdevkit/VOC2012/
      JPEGImages/2007_000032.jpg
      SegmentationClass/2007_000032.png          palette PNGs: index = class id, 255 = border
      ImageSets/Segmentation/{train,val,trainval}.txt

``root`` may be the ``VOC2012`` folder, the ``VOCdevkit`` folder or the folder holding
``VOCdevkit``.

The augmented training set (VOC train + the SBD annotations of Hariharan et al.,
10,582 images in the usual setup) is read with ``split="train_aug"`` (aliases
``"trainaug"``, ``"aug"``). Accepted:

- masks in ``SegmentationClassAug/`` (single-channel PNGs of class ids, as in the
  widely shared ``SegmentationClassAug.zip``; palette PNGs work too), inside
  ``VOC2012/`` or next to it;
- the list as ``ImageSets/Segmentation/train_aug.txt`` (or ``trainaug.txt``,
  ``aug.txt``), or a ``train_aug.txt`` in the ``VOC2012`` folder, the ``VOCdevkit``
  folder or the folder above it. Lines are stems (``2007_000032``) or
  ``image mask`` path pairs (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``);
  only the stem is used. Images always come from ``JPEGImages/``.

The VOC 2012 test labels are not public, so there is no "test" split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from everseg.data._layout import find_root, read_list
from everseg.data.dataset import Sample, SegmentationDataset
from everseg.data.errors import DataError, raise_problems
from everseg.data.labelspace import IGNORE_INDEX, LabelSpace
from everseg.data.masks import MaskMapping

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The VOC palette: the bits of the class id spread over the high bits of R, G and B."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return colours


VOC_PALETTE = tuple(voc_colormap(len(VOC_CLASSES)))
VOC_LABELS = LabelSpace(names=VOC_CLASSES, palette=VOC_PALETTE)
VOC_SPLITS = ("train", "val", "trainval", "train_aug")
_AUG_ALIASES = {"train_aug": "train_aug", "trainaug": "train_aug", "aug": "train_aug"}


def find_voc_root(root: str | Path) -> Path:
    """The ``VOC2012`` folder for a ``root`` that is it, ``VOCdevkit`` or its parent."""
    return find_root(root, ("", "VOC2012", "VOCdevkit/VOC2012"),
                     lambda p: (p / "JPEGImages").is_dir(), "Pascal VOC 2012",
                     "VOCdevkit/VOC2012/JPEGImages, SegmentationClass and ImageSets/Segmentation")


def find_aug_list(voc: Path, given_root: Path) -> Path:
    """The train_aug split list (see the module docstring for where it may be)."""
    seg = voc / "ImageSets" / "Segmentation"
    candidates = [seg / "train_aug.txt", seg / "trainaug.txt", seg / "aug.txt",
                  voc / "train_aug.txt", voc.parent / "train_aug.txt",
                  voc.parent.parent / "train_aug.txt", given_root / "train_aug.txt"]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(seg / "train_aug.txt", "no train_aug list found (also looked for trainaug.txt, "
                                           "aug.txt and train_aug.txt next to VOC2012/ and VOCdevkit/)")


def find_aug_masks(voc: Path) -> Path:
    """The SegmentationClassAug folder, inside VOC2012/ or next to it."""
    for c in (voc / "SegmentationClassAug", voc.parent / "SegmentationClassAug",
              voc.parent.parent / "SegmentationClassAug"):
        if c.is_dir():
            return c
    raise DataError(voc / "SegmentationClassAug", "missing: the train_aug split needs the SBD masks "
                                                  "in SegmentationClassAug/")


def load_voc(root: str | Path, split: str = "train", **dataset_kwargs: Any) -> SegmentationDataset:
    """VOC 2012 ``split`` ("train", "val", "trainval" or "train_aug") at ``root``."""
    given = Path(root)
    key = _AUG_ALIASES.get(split, split)
    if key == "test":
        raise DataError(given, "the Pascal VOC 2012 test labels are not public; evaluate on 'val' "
                               "(or submit test predictions to the VOC evaluation server)")
    if key not in VOC_SPLITS:
        raise ValueError(f"unknown VOC split {split!r}; choose from {VOC_SPLITS}")
    voc = find_voc_root(given)
    if key == "train_aug":
        listing, mask_dir = find_aug_list(voc, given), find_aug_masks(voc)
    else:
        listing = voc / "ImageSets" / "Segmentation" / f"{key}.txt"
        mask_dir = voc / "SegmentationClass"
        if not listing.is_file():
            raise DataError(listing, f"missing: the VOC '{key}' split list")
    img_dir = voc / "JPEGImages"
    problems: list[DataError] = []
    samples = []
    seen: set[str] = set()
    for lineno, stem in read_list(listing):
        if stem in seen:
            continue  # a stem listed twice is read once
        seen.add(stem)
        image, mask = img_dir / f"{stem}.jpg", mask_dir / f"{stem}.png"
        if not image.is_file():
            problems.append(DataError(listing, f"line {lineno}: {stem!r} has no image ({image} is missing)"))
        elif not mask.is_file():
            problems.append(DataError(image, f"has no mask ({mask} is missing)"))
        else:
            samples.append(Sample(image, mask, stem))
    mapping = MaskMapping.identity(len(VOC_CLASSES), ignore=(IGNORE_INDEX,))
    raise_problems(problems, lambda: SegmentationDataset(samples, VOC_LABELS, mapping, name=f"voc/{key}",
                                                         **{**dataset_kwargs, "cache": "none"}))
    if not samples:
        raise DataError(listing, "lists no images")
    return SegmentationDataset(samples, VOC_LABELS, mapping, name=f"voc/{key}", **dataset_kwargs)

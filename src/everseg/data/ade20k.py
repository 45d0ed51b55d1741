"""ADE20K as used by the SceneParsing benchmark (ADEChallengeData2016), 150 classes.

Layout, as ``ADEChallengeData2016.zip`` unpacks::

    ADEChallengeData2016/
      images/training/ADE_train_00000001.jpg        (20,210 images)
      images/validation/ADE_val_00000001.jpg        (2,000 images)
      annotations/training/ADE_train_00000001.png   single-channel, 0 = other/unlabelled,
      annotations/validation/ADE_val_00000001.png   k = class k (1..150)

``root`` may be ``ADEChallengeData2016`` or the folder holding it. Masks are read
with the usual "reduce zero label" convention: 0 becomes ignore (255) and class k
becomes k - 1, so class ids run 0..149. Values above 150 are errors.

Splits: "train" (= training) and "val" (= validation); the folder names are
accepted too. The test images (``release_test``) have no public labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from everseg.data._layout import find_root, stems_in
from everseg.data.dataset import Sample, SegmentationDataset
from everseg.data.errors import DataError, raise_problems
from everseg.data.labelspace import IGNORE_INDEX, LabelSpace
from everseg.data.masks import MaskMapping

# The 150 SceneParsing classes in id order (the first name of each objectInfo150 entry).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
ADE20K_LABELS = LabelSpace(names=ADE20K_CLASSES)  # no official palette: the default colours
_SPLIT_FOLDERS = {"train": "training", "training": "training",
                  "val": "validation", "validation": "validation"}
ADE20K_SPLITS = ("train", "val")


def reduce_zero_label_mapping(num_classes: int = len(ADE20K_CLASSES)) -> MaskMapping:
    """0 -> ignore, k -> k - 1 for k in 1..num_classes; anything else is an error."""
    table = {0: IGNORE_INDEX, **{k: k - 1 for k in range(1, num_classes + 1)}}
    return MaskMapping.from_values(table, description=f"ADE20K: 0 = unlabelled -> ignore, "
                                                      f"1..{num_classes} -> 0..{num_classes - 1}")


def find_ade20k_root(root: str | Path) -> Path:
    return find_root(root, ("", "ADEChallengeData2016"),
                     lambda p: (p / "images").is_dir() and (p / "annotations").is_dir()
                     and ((p / "images" / "training").is_dir() or (p / "images" / "validation").is_dir()),
                     "ADE20K (ADEChallengeData2016)",
                     "images/{training,validation}/ and annotations/{training,validation}/")


def load_ade20k(root: str | Path, split: str = "train", **dataset_kwargs: Any) -> SegmentationDataset:
    """ADE20K SceneParsing ``split`` ("train" or "val") with 150 classes, zero label reduced."""
    given = Path(root)
    if split in ("test", "testing", "release_test"):
        raise DataError(given, "the ADE20K test images have no public labels; evaluate on 'val'")
    if split not in _SPLIT_FOLDERS:
        raise ValueError(f"unknown ADE20K split {split!r}; choose from {ADE20K_SPLITS}")
    base = find_ade20k_root(given)
    folder = _SPLIT_FOLDERS[split]
    img_dir, ann_dir = base / "images" / folder, base / "annotations" / folder
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise DataError(d, f"missing: the ADE20K '{folder}' folder")
    problems: list[DataError] = []
    images = stems_in(img_dir, (".jpg", ".jpeg", ".png"), problems, "image")
    masks = stems_in(ann_dir, (".png",), problems, "annotation")
    for stem in sorted(set(images) - set(masks)):
        problems.append(DataError(images[stem], f"has no annotation (expected {ann_dir / stem}.png)"))
    for stem in sorted(set(masks) - set(images)):
        problems.append(DataError(masks[stem], f"has no image in {img_dir}"))
    if not images and not masks:
        problems.append(DataError(img_dir, "holds no images"))
    samples = [Sample(images[s], masks[s], s) for s in sorted(images) if s in masks]
    mapping = reduce_zero_label_mapping()
    raise_problems(problems, lambda: SegmentationDataset(samples, ADE20K_LABELS, mapping,
                                                         name=f"ade20k/{folder}",
                                                         **{**dataset_kwargs, "cache": "none"}))
    return SegmentationDataset(samples, ADE20K_LABELS, mapping, name=f"ade20k/{folder}",
                               **dataset_kwargs)

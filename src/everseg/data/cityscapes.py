"""Cityscapes (fine annotations), the 19 evaluation classes.

Layout, as the official ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``
unpack side by side::

    root/leftImg8bit/{train,val,test}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    root/gtFine/{train,val,test}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

The ``labelIds`` masks hold the 34 original label ids; they are mapped to the 19
``trainIds`` with the official table (:data:`CITYSCAPES_LABEL_IDS`); every other value
becomes ignore (255). When every image of the split also has the
``_gtFine_labelTrainIds.png`` made by cityscapesScripts' ``createTrainIdLabelImgs``,
those are read instead (values 0..18, 255). ``Sample.group`` is the city.

``root`` may also be a folder holding a single ``cityscapes/`` folder. The test split's
labels are not public (its masks are placeholders), so "test" is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from everseg.data._layout import find_root
from everseg.data.dataset import Sample, SegmentationDataset
from everseg.data.errors import DataError, raise_problems
from everseg.data.labelspace import IGNORE_INDEX, LabelSpace
from everseg.data.masks import MaskMapping

# (label id, name, train id): the official Cityscapes label table; 255 = not evaluated.
CITYSCAPES_LABEL_IDS: tuple[tuple[int, str, int], ...] = (
    (0, "unlabeled", 255), (1, "ego vehicle", 255), (2, "rectification border", 255),
    (3, "out of roi", 255), (4, "static", 255), (5, "dynamic", 255), (6, "ground", 255),
    (7, "road", 0), (8, "sidewalk", 1), (9, "parking", 255), (10, "rail track", 255),
    (11, "building", 2), (12, "wall", 3), (13, "fence", 4), (14, "guard rail", 255),
    (15, "bridge", 255), (16, "tunnel", 255), (17, "pole", 5), (18, "polegroup", 255),
    (19, "traffic light", 6), (20, "traffic sign", 7), (21, "vegetation", 8),
    (22, "terrain", 9), (23, "sky", 10), (24, "person", 11), (25, "rider", 12),
    (26, "car", 13), (27, "truck", 14), (28, "bus", 15), (29, "caravan", 255),
    (30, "trailer", 255), (31, "train", 16), (32, "motorcycle", 17), (33, "bicycle", 18),
)  # "license plate" has id -1 and is never written to labelIds images.

CITYSCAPES_CLASSES = tuple(name for _, name, t in sorted(CITYSCAPES_LABEL_IDS, key=lambda r: r[2])
                           if t != IGNORE_INDEX)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
CITYSCAPES_LABELS = LabelSpace(names=CITYSCAPES_CLASSES, palette=CITYSCAPES_PALETTE)
CITYSCAPES_SPLITS = ("train", "val", "trainval")

_IMG_SUFFIX = "_leftImg8bit.png"
_LABEL_IDS = "_gtFine_labelIds.png"
_TRAIN_IDS = "_gtFine_labelTrainIds.png"


def label_ids_mapping() -> MaskMapping:
    """labelIds -> trainIds; any value outside the table's train classes becomes 255."""
    table = {lid: tid for lid, _, tid in CITYSCAPES_LABEL_IDS}
    return MaskMapping.from_values(table, strict=False,
                                   description="Cityscapes labelIds -> 19 trainIds (rest ignored)")


def find_cityscapes_root(root: str | Path) -> Path:
    return find_root(root, ("", "cityscapes", "Cityscapes"),
                     lambda p: (p / "leftImg8bit").is_dir() and (p / "gtFine").is_dir(),
                     "Cityscapes", "leftImg8bit/ and gtFine/ side by side")


def _split_samples(root: Path, split: str,
                   problems: list[DataError]) -> tuple[list[Sample], list[Sample]]:
    """Samples of one split with their labelIds masks and with their labelTrainIds masks
    (``mask`` None where that file is missing); pairing problems go to ``problems``."""
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for d in (img_dir, gt_dir):
        if not d.is_dir():
            raise DataError(d, f"missing: the Cityscapes '{split}' split folder")
    label_ids, train_ids = [], []
    stems: set[str] = set()
    for img in sorted(img_dir.glob(f"*/*{_IMG_SUFFIX}")):
        city, base = img.parent.name, img.name[: -len(_IMG_SUFFIX)]
        stems.add(f"{city}/{base}")
        lid, tid = gt_dir / city / f"{base}{_LABEL_IDS}", gt_dir / city / f"{base}{_TRAIN_IDS}"
        if not lid.is_file() and not tid.is_file():
            problems.append(DataError(img, f"has no mask (expected {lid})"))
            continue
        label_ids.append(Sample(img, lid if lid.is_file() else None, base, city))
        train_ids.append(Sample(img, tid if tid.is_file() else None, base, city))
    for suffix in (_LABEL_IDS, _TRAIN_IDS):
        for mask in sorted(gt_dir.glob(f"*/*{suffix}")):
            if f"{mask.parent.name}/{mask.name[: -len(suffix)]}" not in stems:
                problems.append(DataError(mask, f"has no image in {img_dir / mask.parent.name}"))
    if not stems:
        problems.append(DataError(img_dir, f"no *{_IMG_SUFFIX} images in {split}/<city>/"))
    return label_ids, train_ids


def load_cityscapes(root: str | Path, split: str = "train", **dataset_kwargs: Any) -> SegmentationDataset:
    """Cityscapes fine ``split`` ("train", "val" or "trainval") with 19 train classes."""
    given = Path(root)
    if split == "test":
        raise DataError(given, "the Cityscapes test labels are not public (gtFine/test holds "
                               "placeholders); evaluate on 'val' or submit to the benchmark server")
    if split not in CITYSCAPES_SPLITS:
        raise ValueError(f"unknown Cityscapes split {split!r}; choose from {CITYSCAPES_SPLITS}")
    base = find_cityscapes_root(given)
    problems: list[DataError] = []
    label_ids: list[Sample] = []
    train_ids: list[Sample] = []
    for s in ("train", "val") if split == "trainval" else (split,):
        lid, tid = _split_samples(base, s, problems)
        label_ids += lid
        train_ids += tid
    if train_ids and all(s.mask is not None for s in train_ids):
        samples = train_ids
        mapping = MaskMapping.identity(len(CITYSCAPES_CLASSES), ignore=(IGNORE_INDEX,))
    else:  # labelIds for every image, so one mapping serves the whole dataset
        samples = label_ids
        mapping = label_ids_mapping()
        problems += [DataError(s.image, f"has a {_TRAIN_IDS} mask but no {_LABEL_IDS}, while other "
                                        "images have no trainIds mask; keep the labelIds masks")
                     for s in label_ids if s.mask is None]
    raise_problems(problems, lambda: SegmentationDataset(
        [s for s in samples if s.mask is not None], CITYSCAPES_LABELS, mapping,
        name=f"cityscapes/{split}", **{**dataset_kwargs, "cache": "none"}))
    return SegmentationDataset(samples, CITYSCAPES_LABELS, mapping, name=f"cityscapes/{split}",
                               **dataset_kwargs)

"""One entry point for every dataset kind: ``open_dataset(root, dataset=..., split=...)``.

:data:`DATASET_READERS` is a plain dict from a dataset kind to its reader function, so
"go to definition" on a reader leads straight to the code. :func:`detect_dataset`
guesses the kind from the folder layout when none is given.

Split names per kind ("train" / "val" / "test" mean the obvious thing where they exist):

============  ======================================  ===========================
kind          splits                                   no public labels
============  ======================================  ===========================
camvid        train, val, test, trainval
folder        train, val, test (from the lists), all
voc           train, val, trainval, train_aug          test
cityscapes    train, val, trainval                     test
ade20k        train (= training), val (= validation)   test
============  ======================================  ===========================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from everseg.data.ade20k import load_ade20k
from everseg.data.camvid import CAMVID_SPLITS, load_camvid
from everseg.data.cityscapes import load_cityscapes
from everseg.data.dataset import SegmentationDataset
from everseg.data.errors import DataError
from everseg.data.folder import load_folder
from everseg.data.voc import find_aug_list, find_aug_masks, find_voc_root, load_voc

DATASET_READERS: dict[str, Callable[..., SegmentationDataset]] = {
    "camvid": load_camvid,
    "folder": load_folder,
    "voc": load_voc,
    "cityscapes": load_cityscapes,
    "ade20k": load_ade20k,
}

_SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}


def _is_camvid(p: Path) -> bool:
    return any((p / s).is_dir() and (p / f"{s}annot").is_dir() for s in CAMVID_SPLITS)


def _is_folder(p: Path) -> bool:
    return (p / "images").is_dir() and (p / "masks").is_dir()


def _cityscapes_base(p: Path) -> Path | None:
    for c in (p, p / "cityscapes", p / "Cityscapes"):
        if (c / "leftImg8bit").is_dir() and (c / "gtFine").is_dir():
            return c
    return None


def _ade20k_base(p: Path) -> Path | None:
    for c in (p, p / "ADEChallengeData2016"):
        if (c / "images").is_dir() and (c / "annotations").is_dir() and any(
                (c / "images" / f).is_dir() for f in ("training", "validation")):
            return c
    return None


def _voc_base(p: Path) -> Path | None:
    try:
        return find_voc_root(p)
    except DataError:
        return None


def detect_dataset(root: str | Path) -> str:
    """The dataset kind (a key of :data:`DATASET_READERS`) that the layout at ``root`` matches."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder does not exist" if not root.exists() else "is not a folder")
    if _is_camvid(root):
        return "camvid"
    if _is_folder(root):
        return "folder"
    if _cityscapes_base(root) is not None:
        return "cityscapes"
    if _ade20k_base(root) is not None:
        return "ade20k"
    if _voc_base(root) is not None:
        return "voc"
    raise DataError(root, "cannot tell which dataset this is. Expected one of: "
                          "camvid (train/ + trainannot/), folder (images/ + masks/ + classes.txt), "
                          "voc (VOCdevkit/VOC2012/JPEGImages), cityscapes (leftImg8bit/ + gtFine/), "
                          "ade20k (ADEChallengeData2016/images + annotations). "
                          f"Pass dataset= one of {list(DATASET_READERS)} to say which.")


def dataset_kind(root: str | Path, dataset: str | None) -> str:
    """``dataset`` checked against :data:`DATASET_READERS`, or detected from ``root`` when None."""
    if dataset is None:
        return detect_dataset(root)
    kind = dataset.lower()
    if kind not in DATASET_READERS:
        raise ValueError(f"unknown dataset kind {dataset!r}; choose from {list(DATASET_READERS)}")
    return kind


def open_dataset(root: str | Path, *, dataset: str | None = None, split: str = "train",
                 **kwargs: Any) -> SegmentationDataset:
    """Read ``split`` of the dataset at ``root``; ``dataset=None`` detects the kind from the layout.

    ``kwargs`` go to the reader (and from there to :class:`SegmentationDataset`, e.g.
    ``cache="none"`` or ``transform=...``).
    """
    root = Path(root)
    kind = dataset_kind(root, dataset)
    if kind != "ade20k":
        split = _SPLIT_ALIASES.get(split, split)
    return DATASET_READERS[kind](root, split, **kwargs)


def available_splits(root: str | Path, dataset: str | None = None) -> list[str]:
    """The labelled splits present at ``root`` (combined ones like "trainval" left out).

    A folder-format dataset without split lists has the single split "all".
    """
    root = Path(root)
    kind = dataset_kind(root, dataset)
    if kind == "camvid":
        return [s for s in CAMVID_SPLITS if (root / f"{s}.txt").is_file() or (root / s).is_dir()]
    if kind == "folder":
        lists = [s for s in ("train", "val", "test") if (root / f"{s}.txt").is_file()]
        return lists or ["all"]
    if kind == "voc":
        voc = _voc_base(root)
        if voc is None:
            return []
        seg = voc / "ImageSets" / "Segmentation"
        found = [s for s in ("train", "val") if (seg / f"{s}.txt").is_file()]
        try:
            find_aug_list(voc, root), find_aug_masks(voc)
            found.append("train_aug")
        except DataError:
            pass
        return found
    if kind == "cityscapes":
        base = _cityscapes_base(root)
        return [s for s in ("train", "val") if base is not None and (base / "leftImg8bit" / s).is_dir()]
    base = _ade20k_base(root)
    return [s for s, f in (("train", "training"), ("val", "validation"))
            if base is not None and (base / "images" / f).is_dir()]

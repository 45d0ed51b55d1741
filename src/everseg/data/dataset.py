"""The dataset every reader returns: a list of image/mask pairs plus how to decode them.

Decoding PNGs every epoch is the bottleneck of CPU training, so a dataset that
fits the memory budget is decoded once and kept as uint8 arrays
(``cache="auto"``, the default). ``memory_bytes()`` says what that costs.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from everseg.data.errors import DataError
from everseg.data.io import read_image, read_mask
from everseg.data.labelspace import LabelSpace
from everseg.data.masks import MaskMapping

CacheMode = Literal["auto", "memory", "none"]
DEFAULT_CACHE_LIMIT_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class Sample:
    """One image and its label mask (``mask`` is None for unlabelled images)."""

    image: Path
    mask: Path | None
    stem: str
    group: str = ""  # e.g. the video sequence or city, used for domain splits


Item = dict[str, Any]
JointTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SegmentationDataset(Dataset):
    """Image/mask pairs that decode to ``{"image": uint8 3xHxW, "mask": int64 HxW, "stem"}``.

    ``transform`` is a joint transform ``(image, mask) -> (image, mask)`` (see
    :mod:`everseg.data.transforms`). Masks hold class ids with 255 = ignore.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        label_space: LabelSpace,
        mask_mapping: MaskMapping,
        *,
        transform: JointTransform | None = None,
        cache: CacheMode = "auto",
        cache_limit_bytes: int = DEFAULT_CACHE_LIMIT_BYTES,
        name: str = "",
    ):
        if not samples:
            raise DataError(None, f"dataset {name or ''} has no images".replace("  ", " "))
        self.samples = list(samples)
        self.label_space = label_space
        self.mask_mapping = mask_mapping
        self.transform = transform
        self.name = name
        self.cache_limit_bytes = cache_limit_bytes
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        # Applied to decoded masks on access (incremental steps relabel without copying the cache).
        self.label_map: np.ndarray | None = None
        if cache == "memory" or (cache == "auto" and self.memory_bytes() <= cache_limit_bytes):
            self.cache_in_memory()

    @classmethod
    def from_arrays(cls, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], label_space: LabelSpace,
                    stems: Sequence[str] | None = None, name: str = "in-memory") -> "SegmentationDataset":
        """A dataset of images (uint8 H x W x 3) and class-id masks already in memory."""
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        stems = list(stems) if stems is not None else [f"{name}-{i}" for i in range(len(images))]
        pairs = []
        for stem, image, mask in zip(stems, images, masks):
            image, mask = np.asarray(image, dtype=np.uint8), np.asarray(mask, dtype=np.uint8)
            if image.ndim != 3 or image.shape[2] != 3:
                raise DataError(stem, f"image must be H x W x 3, got shape {image.shape}")
            if mask.shape != image.shape[:2]:
                raise DataError(stem, f"mask is {mask.shape} but the image is {image.shape[:2]}")
            bad = mask[(mask >= label_space.num_classes) & (mask != label_space.ignore_index)]
            if bad.size:
                raise DataError(stem, f"mask has label values {np.unique(bad)[:10].tolist()} outside the "
                                      f"{label_space.num_classes} classes")
            pairs.append((image, mask))
        ds = cls.__new__(cls)
        ds.samples = [Sample(Path(f"<{name}>/{s}"), None, s) for s in stems]
        ds.label_space, ds.mask_mapping, ds.transform, ds.name = label_space, None, None, name
        ds.cache_limit_bytes, ds._cache, ds.label_map = DEFAULT_CACHE_LIMIT_BYTES, pairs, None
        return ds

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        cached = "cached" if self._cache is not None else "from disk"
        return f"SegmentationDataset({self.name!r}, {len(self)} images, {cached})"

    # -- decoding -------------------------------------------------------------------------
    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode sample ``index``: RGB uint8 H x W x 3 and class ids uint8 H x W."""
        s = self.samples[index]
        image = read_image(s.image)
        if s.mask is None:
            mask = np.full(image.shape[:2], self.label_space.ignore_index, dtype=np.uint8)
        else:
            mask = self.mask_mapping.apply(read_mask(s.mask), s.mask)
            if mask.shape != image.shape[:2]:
                raise DataError(s.mask, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                        f"{s.image.name} is {image.shape[1]}x{image.shape[0]} (WxH)")
        return image, mask

    def memory_bytes(self) -> int:
        """Bytes the decoded uint8 images + masks take (exact once cached, else estimated)."""
        if self._cache is not None:
            return sum(i.nbytes + m.nbytes for i, m in self._cache)
        from PIL import Image

        try:
            with Image.open(self.samples[0].image) as im:
                w, h = im.size
        except OSError:
            return 1 << 62  # unreadable: never pick caching on a guess; load() will report it
        return len(self.samples) * w * h * 4

    def cache_in_memory(self, workers: int | None = None) -> int:
        """Decode every sample once and keep it; returns the bytes used."""
        if self._cache is None:
            workers = workers or min(4, os.cpu_count() or 1)
            # PNG decoding releases the GIL, so threads give a real speed-up.
            with ThreadPoolExecutor(workers) as pool:
                self._cache = list(pool.map(self.load, range(len(self))))
        return self.memory_bytes()

    @property
    def is_cached(self) -> bool:
        return self._cache is not None

    # -- access ---------------------------------------------------------------------------
    def decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and class-id mask of sample ``index``, relabelled if this view has a label map."""
        image, mask = self._cache[index] if self._cache is not None else self.load(index)
        return (image, mask) if self.label_map is None else (image, self.label_map[mask])

    def __getitem__(self, index: int) -> Item:
        image, mask = self.decoded(index)
        img_t = torch.from_numpy(image).permute(2, 0, 1)
        mask_t = torch.from_numpy(mask)
        if self.transform is not None:
            img_t, mask_t = self.transform(img_t, mask_t)
        return {"image": img_t.contiguous(), "mask": mask_t.long(), "stem": self.samples[index].stem}

    def with_transform(self, transform: JointTransform | None) -> "SegmentationDataset":
        """A view with another transform that shares the decoded cache."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def subset(self, indices: Sequence[int], name: str | None = None) -> "SegmentationDataset":
        """A view on some samples that shares the decoded cache."""
        other = copy.copy(self)
        other.samples = [self.samples[i] for i in indices]
        if self._cache is not None:
            other._cache = [self._cache[i] for i in indices]
        other.name = name if name is not None else self.name
        return other

    def relabel(self, label_map: np.ndarray, label_space: LabelSpace,
                name: str | None = None) -> "SegmentationDataset":
        """A view whose masks go through ``label_map`` (256 entries: old id -> new id, 255 kept)."""
        lut = np.asarray(label_map, dtype=np.uint8)
        if lut.shape != (256,):
            raise ValueError(f"label_map must have 256 entries, got shape {lut.shape}")
        other = copy.copy(self)
        other.label_map = lut if self.label_map is None else lut[self.label_map]
        other.label_space = label_space
        other.name = name if name is not None else self.name
        return other

    def class_pixel_counts(self, per_image: bool = False) -> np.ndarray:
        """Labelled pixels per class (images x classes if ``per_image``); decodes if not cached."""
        n = self.label_space.num_classes
        counts = np.zeros((len(self), n), dtype=np.int64)
        for i in range(len(self)):
            _, mask = self.decoded(i)
            counts[i] = np.bincount(mask.ravel(), minlength=256)[:n]
        return counts if per_image else counts.sum(0)

"""Replay memory: a fixed budget of labelled images kept from earlier steps, saved with the model.

Which images to keep (the *policy*) is separate from the strategies that replay them:

- ``reservoir`` (Vitter 1985; Chaudhry et al. 2019 for continual learning): every image
  seen so far has the same chance, budget / seen, of being in memory;
- ``class_balanced``: each class learned so far gets an equal share of the budget, filled
  with the images where that class covers the most pixels (rare classes are kept).

Items keep the mask as it was labelled when stored (the classes known then); class ids
never change meaning later, since new classes are appended.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from everseg.atomic import atomic_write_json
from everseg.data.dataset import SegmentationDataset
from everseg.data.errors import DataError

PolicyName = Literal["reservoir", "class_balanced"]


@dataclass
class MemoryItem:
    stem: str
    step: int
    image: np.ndarray  # uint8 H x W x 3
    mask: np.ndarray  # uint8 H x W, class ids as labelled at ``step``
    # PNG bytes of (image, mask), made once: every version the online learner publishes saves
    # the whole memory again, and encoding 20 images took most of a publish (0.4-1 s).
    _png: tuple[bytes, bytes] | None = field(default=None, repr=False, compare=False)

    def encoded(self) -> tuple[bytes, bytes]:
        if self._png is None:
            self._png = (_png_bytes(self.image), _png_bytes(self.mask))
        return self._png

    def classes(self, ignore_index: int = 255) -> np.ndarray:
        ids, counts = np.unique(self.mask, return_counts=True)
        return ids[ids != ignore_index]


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class StoragePolicy(ABC):
    """Which images a memory keeps: :meth:`update` offers it a step's training images."""

    name = "policy"

    @abstractmethod
    def update(self, memory: "ReplayMemory", dataset: SegmentationDataset, step: int) -> None:
        """Change ``memory.items`` (within ``memory.budget``) given the step's ``dataset``."""


class Reservoir(StoragePolicy):
    """Every image seen so far has the same chance, budget / seen, of being kept."""

    name = "reservoir"

    def update(self, memory: "ReplayMemory", dataset: SegmentationDataset, step: int) -> None:
        for i in range(len(dataset)):
            memory.seen += 1
            if len(memory.items) < memory.budget:
                memory.items.append(_item(dataset, i, step))
            else:
                j = memory.rng.randrange(memory.seen)
                if j < memory.budget:
                    memory.items[j] = _item(dataset, i, step)


class ClassBalanced(StoragePolicy):
    """Each class learned so far gets an equal share of the budget, filled with the images where
    it covers the most pixels, so rare classes are kept. Class 0 claims no share when it is the
    background (``ignore_background``): it is in nearly every image anyway."""

    name = "class_balanced"

    def __init__(self, ignore_background: bool = True):
        self.ignore_background = ignore_background

    def update(self, memory: "ReplayMemory", dataset: SegmentationDataset, step: int) -> None:
        counts = dataset.class_pixel_counts(per_image=True)
        candidates: dict[int, list[tuple[int, str, int]]] = {}  # class -> [(pixels, source, index)]
        for item_idx, item in enumerate(memory.items):
            for c in item.classes():
                if c == 0 and self.ignore_background:
                    continue
                candidates.setdefault(int(c), []).append((int((item.mask == c).sum()), "memory", item_idx))
        for i in range(len(dataset)):
            for c in np.nonzero(counts[i])[0]:
                if c == 0 and self.ignore_background:
                    continue
                candidates.setdefault(int(c), []).append((int(counts[i, c]), "new", i))
        if not candidates:
            return
        for lst in candidates.values():
            lst.sort(key=lambda x: -x[0])
        chosen: list[tuple[str, int]] = []
        # Round-robin over classes, rarest first, each taking its best remaining image.
        order = sorted(candidates, key=lambda c: len(candidates[c]))
        pointers = {c: 0 for c in order}
        while len(chosen) < memory.budget and any(pointers[c] < len(candidates[c]) for c in order):
            for c in order:
                while pointers[c] < len(candidates[c]):
                    _, src, idx = candidates[c][pointers[c]]
                    pointers[c] += 1
                    if (src, idx) not in chosen:
                        chosen.append((src, idx))
                        break
                if len(chosen) >= memory.budget:
                    break
        memory.items = [memory.items[idx] if src == "memory" else _item(dataset, idx, step) for src, idx in chosen]


POLICIES: dict[str, type[StoragePolicy]] = {"reservoir": Reservoir, "class_balanced": ClassBalanced}


def _item(dataset: SegmentationDataset, i: int, step: int) -> MemoryItem:
    image, mask = dataset.decoded(i)
    return MemoryItem(dataset.samples[i].stem, step, image.copy(), mask.copy())


class ReplayMemory:
    """A budget of stored images and the :class:`StoragePolicy` that chooses them."""

    def __init__(self, budget: int, *, policy: PolicyName | StoragePolicy = "class_balanced", seed: int = 0):
        if budget < 0:
            raise ValueError("memory budget must be >= 0")
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ValueError(f"unknown memory policy {policy!r}; choose {' or '.join(POLICIES)}")
            policy = POLICIES[policy]()
        self.budget = budget
        self.policy = policy
        self.items: list[MemoryItem] = []
        self.seen = 0  # images offered so far (reservoir)
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def pixel_counts(self, num_classes: int, ignore_index: int = 255,
                     background_stale_before: int | None = None) -> np.ndarray:
        """Class pixel counts per stored image (items x classes), as replay trains on them:
        background of items stored before step ``background_stale_before`` is not counted."""
        rows = []
        for item in self.items:
            m = item.mask[item.mask != ignore_index]
            if background_stale_before is not None and item.step < background_stale_before:
                m = m[m != 0]
            rows.append(np.bincount(m.ravel(), minlength=num_classes)[:num_classes])
        return np.stack(rows) if rows else np.zeros((0, num_classes), np.int64)

    def update(self, dataset: SegmentationDataset, step: int) -> None:
        """Offer every image of ``dataset`` (a step's training view) to the memory."""
        if self.budget > 0:
            self.policy.update(self, dataset, step)

    # ------------------------------------------------------------------ on disk
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        index = []
        for k, item in enumerate(self.items):
            name = f"{k:04d}_{item.stem}"
            image_png, mask_png = item.encoded()
            (d / f"{name}.png").write_bytes(image_png)
            (d / f"{name}_mask.png").write_bytes(mask_png)
            index.append({"name": name, "stem": item.stem, "step": item.step})
        atomic_write_json(d / "memory.json", {"budget": self.budget, "policy": self.policy.name, "seen": self.seen,
                                              "items": index})
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "ReplayMemory":
        d = Path(directory)
        meta_path = d / "memory.json"
        if not meta_path.is_file():
            raise DataError(meta_path, "no replay memory here (memory.json missing)")
        meta = json.loads(meta_path.read_text())
        mem = cls(meta["budget"], policy=meta["policy"])
        mem.seen = meta.get("seen", 0)
        for entry in meta["items"]:
            image_png = (d / f"{entry['name']}.png").read_bytes()
            mask_png = (d / f"{entry['name']}_mask.png").read_bytes()
            decoded = Image.open(io.BytesIO(image_png))
            rgb = decoded.mode == "RGB"  # else saving again must write the converted image
            img = np.array(decoded.convert("RGB"))
            mask = np.array(Image.open(io.BytesIO(mask_png)))
            mem.items.append(MemoryItem(entry["stem"], entry["step"], img, mask,
                                        _png=(image_png, mask_png) if rgb else None))
        return mem

    def as_dataset(self, transform=None) -> "MemoryDataset":
        return MemoryDataset(self, transform)


class MemoryDataset(Dataset):
    """The memory's items as training items, through the same joint transform as the step's data."""

    def __init__(self, memory: ReplayMemory, transform=None):
        self.memory = memory
        self.transform = transform

    def __len__(self) -> int:
        return len(self.memory)

    def __getitem__(self, i: int) -> dict:
        item = self.memory.items[i]
        image = torch.from_numpy(item.image).permute(2, 0, 1)
        mask = torch.from_numpy(item.mask)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {"image": image.contiguous(), "mask": mask.long(), "stem": item.stem, "step": item.step}

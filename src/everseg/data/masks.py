"""Turning raw mask values into class ids (uint8, ignore = 255).

Datasets store labels in different ways: class ids directly (CamVid, VOC),
values that stand for classes (binary 0/255 masks), ids that must be remapped
(Cityscapes labelIds -> trainIds, ADE20K's reduced zero label) or RGB colours.
A ``MaskMapping`` says which, and rejects values it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from everseg.data.errors import DataError
from everseg.data.labelspace import IGNORE_INDEX

_UNMAPPED = -1


@dataclass(frozen=True)
class MaskMapping:
    """Raw value (or RGB colour) -> class id. Values not in the table are errors.

    Build one with :meth:`identity`, :meth:`from_values` or :meth:`from_colors`.
    """

    lut: np.ndarray | None = None  # int16 table over raw values, -1 = not allowed
    colors: Mapping[tuple[int, int, int], int] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def identity(cls, num_classes: int, *, ignore: Sequence[int] = (IGNORE_INDEX,),
                 extra: Mapping[int, int] | None = None) -> "MaskMapping":
        """Values 0..num_classes-1 are class ids; values in ``ignore`` become 255."""
        lut = np.full(65536, _UNMAPPED, dtype=np.int16)
        lut[:num_classes] = np.arange(num_classes)
        for v in ignore:
            lut[v] = IGNORE_INDEX
        for v, c in (extra or {}).items():
            lut[v] = c
        return cls(lut=lut, description=f"class ids 0..{num_classes - 1}, ignore {list(ignore)}")

    @classmethod
    def from_values(cls, table: Mapping[int, int], *, strict: bool = True,
                    description: str = "") -> "MaskMapping":
        """Explicit raw value -> class id (use 255 for ignore). Non-strict maps the rest to ignore."""
        lut = np.full(65536, _UNMAPPED if strict else IGNORE_INDEX, dtype=np.int16)
        for v, c in table.items():
            lut[int(v)] = int(c)
        return cls(lut=lut, description=description or f"values {dict(table)}")

    @classmethod
    def from_colors(cls, colors: Mapping[tuple[int, int, int], int],
                    description: str = "") -> "MaskMapping":
        return cls(colors={tuple(int(x) for x in k): int(v) for k, v in colors.items()},
                   description=description or "RGB colour palette")

    def apply(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Class ids as uint8 H x W; raises DataError naming ``path`` on unknown values."""
        if raw.ndim == 2 and self.lut is None and self.colors:
            # read_mask collapses an RGB mask whose colours are all gray (e.g. only
            # black background) to one channel; expand it back to compare colours.
            raw = np.repeat(raw[..., None], 3, axis=2)
        if raw.ndim == 3:
            if not self.colors:
                raise DataError(path, "mask is a colour image but this dataset expects "
                                      "single-channel class ids")
            return self._apply_colors(raw, path)
        if self.lut is None:
            raise DataError(path, "mask is single-channel but this dataset expects RGB colours")
        if raw.dtype != np.uint8 and (raw.min(initial=0) < 0 or raw.max(initial=0) >= len(self.lut)):
            raise DataError(path, f"mask values out of range [{raw.min()}, {raw.max()}]")
        out = self.lut[raw]
        if (out == _UNMAPPED).any():
            bad = np.unique(raw[out == _UNMAPPED])
            raise DataError(path, f"mask has label values {bad[:10].tolist()} outside the class "
                                  f"set ({self.description})")
        return out.astype(np.uint8)

    def _apply_colors(self, rgb: np.ndarray, path: str | Path) -> np.ndarray:
        code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
        uniq, inverse = np.unique(code, return_inverse=True)
        table = {(r << 16) | (g << 8) | b: c for (r, g, b), c in self.colors.items()}
        mapped = np.empty(len(uniq), dtype=np.int16)
        for i, u in enumerate(uniq.tolist()):
            if u not in table:
                colour = ((u >> 16) & 255, (u >> 8) & 255, u & 255)
                raise DataError(path, f"mask colour {colour} is not in the class palette")
            mapped[i] = table[u]
        return mapped[inverse].reshape(code.shape).astype(np.uint8)

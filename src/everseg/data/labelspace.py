"""The class set every stage shares: names, the ignore index and display colours."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Any, Sequence

IGNORE_INDEX = 255
"""Label value that is left out of losses and metrics (unlabelled pixels, borders)."""


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """Distinct, reproducible colours for ``n`` classes (golden-ratio hue steps)."""
    colours = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        light = 0.45 if i % 2 else 0.6
        r, g, b = colorsys.hls_to_rgb(hue, light, 0.75)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


@dataclass(frozen=True)
class LabelSpace:
    """Class names (index = class id), the ignore index and a colour per class.

    ``taught_at`` records, per class, the incremental step that introduced it
    (all 0 for a model trained in one go).
    """

    names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    palette: tuple[tuple[int, int, int], ...] = field(default=())
    taught_at: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        if not names:
            raise ValueError("LabelSpace needs at least one class name")
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"LabelSpace has duplicate class names: {dupes}")
        if len(names) > 255:
            raise ValueError(f"LabelSpace supports at most 255 classes, got {len(names)}")
        if not 0 <= self.ignore_index <= 255 or self.ignore_index < len(names):
            raise ValueError(
                f"ignore_index {self.ignore_index} must be in [num_classes, 255] "
                f"(num_classes = {len(names)})"
            )
        palette = tuple(tuple(int(c) for c in rgb) for rgb in self.palette) or tuple(
            default_palette(len(names))
        )
        if len(palette) != len(names):
            raise ValueError(f"palette has {len(palette)} colours for {len(names)} classes")
        taught = tuple(int(t) for t in self.taught_at) or (0,) * len(names)
        if len(taught) != len(names):
            raise ValueError(f"taught_at has {len(taught)} entries for {len(names)} classes")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "palette", palette)
        object.__setattr__(self, "taught_at", taught)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no class named {name!r}; classes are {list(self.names)}") from None

    def extend(self, new_names: Sequence[str], *, step: int | None = None,
               palette: Sequence[tuple[int, int, int]] | None = None) -> "LabelSpace":
        """A new LabelSpace with ``new_names`` appended (old ids keep their meaning)."""
        clash = [n for n in new_names if n in self.names]
        if clash:
            raise ValueError(f"classes already present: {clash}")
        step = max(self.taught_at) + 1 if step is None else step
        n_total = self.num_classes + len(new_names)
        extra = list(palette) if palette else default_palette(n_total)[self.num_classes:]
        return LabelSpace(
            names=self.names + tuple(new_names),
            ignore_index=self.ignore_index,
            palette=self.palette + tuple(tuple(c) for c in extra),
            taught_at=self.taught_at + (step,) * len(new_names),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "ignore_index": self.ignore_index,
            "palette": [list(c) for c in self.palette],
            "taught_at": list(self.taught_at),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelSpace":
        return cls(
            names=tuple(d["names"]),
            ignore_index=int(d.get("ignore_index", IGNORE_INDEX)),
            palette=tuple(tuple(c) for c in d.get("palette", ())),
            taught_at=tuple(d.get("taught_at", ())),
        )

"""Joint image + mask augmentation on ``torchvision.transforms.v2``.

Masks are wrapped as ``tv_tensors.Mask`` so every geometric transform resizes
them with nearest interpolation and pads/rotates them with the ignore label (255),
while colour transforms leave them alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from everseg.data.labelspace import IGNORE_INDEX

_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale`` (relative to ``base_size`` if given).

    ``base_size`` (h, w) first brings images of any size to a common resolution, so a
    scale range means the same thing for every image of a dataset.
    """

    def __init__(self, scale: tuple[float, float], base_size: tuple[int, int] | None = None):
        super().__init__()
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale range must satisfy 0 < min <= max, got {scale}")
        self.scale = scale
        self.base_size = base_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        if self.base_size is not None:
            h, w = self.base_size
        s = random.uniform(*self.scale)
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, params["size"], interpolation=v2.InterpolationMode.NEAREST)
        if isinstance(inpt, tv_tensors.Image):
            return F.resize(inpt, params["size"], antialias=True)
        return inpt


class _Pair:
    """Adapts a v2 pipeline to the dataset's ``(image, mask) -> (image, mask)`` call."""

    def __init__(self, pipeline: v2.Transform):
        self.pipeline = pipeline

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, m = self.pipeline(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return img.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"JointTransform({self.pipeline})"


@dataclass(frozen=True)
class AugmentConfig:
    """What the training augmentation does; every field is off when zero/None."""

    crop_size: tuple[int, int] | None = (320, 320)  # (h, w) random crop, padded with ignore
    scale: tuple[float, float] = (0.5, 2.0)  # random rescale range
    base_size: tuple[int, int] | None = None  # (h, w) the scale range is relative to
    hflip: bool = True  # random horizontal flip
    rotation: float = 0.0  # max degrees of random rotation
    color_jitter: float = 0.0  # brightness/contrast/saturation strength (0.2 = +-20%)


def train_transform(cfg: AugmentConfig = AugmentConfig()) -> _Pair:
    steps: list[v2.Transform] = []
    if cfg.scale != (1.0, 1.0) or cfg.base_size is not None:
        steps.append(RandomScale(cfg.scale, cfg.base_size))
    if cfg.rotation:
        steps.append(v2.RandomRotation(cfg.rotation, interpolation=v2.InterpolationMode.BILINEAR,
                                       fill=_FILL))
    if cfg.crop_size is not None:
        steps.append(v2.RandomCrop(cfg.crop_size, pad_if_needed=True, fill=_FILL))
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.color_jitter:
        j = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.05, j / 4)))
    return _Pair(v2.Compose(steps))


def resize_transform(size: tuple[int, int]) -> _Pair:
    """Deterministic resize to (h, w) for evaluation at a fixed resolution."""
    return _Pair(v2.Resize(list(size), antialias=True))

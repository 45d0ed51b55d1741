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


class ClassAwareCrop(v2.Transform):
    """A random crop that, with probability ``p``, is placed around one class of the image.

    The class is drawn uniformly from those in the mask, not in proportion to their pixels,
    and the crop holds one of its pixels at a random position. A pole or a sign covers under
    1 % of a street scene, so a plain random crop mostly shows road and sky; this is the
    class-uniform sampling of Zhu et al. (CVPR 2019, Cityscapes), drawn per image rather than
    over the dataset so it needs no index of which image holds which class. Otherwise, and
    where the mask has no labelled pixel, the crop is uniform as ``v2.RandomCrop``'s. An image
    smaller than the crop is padded at the bottom and right (ignore label in the mask).
    """

    def __init__(self, size: tuple[int, int], p: float):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"class-aware crop share must be in [0, 1], got {p}")
        self.size, self.p = (int(size[0]), int(size[1])), p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch, cw = self.size
        pad_h, pad_w = max(0, ch - h), max(0, cw - w)
        # Rows and columns the crop's corner may take: anywhere, or around the chosen pixel.
        rows, cols = (0, h + pad_h - ch), (0, w + pad_w - cw)
        masks = [x for x in flat_inputs if isinstance(x, tv_tensors.Mask)]
        if masks and random.random() < self.p:
            mask = masks[0].reshape(masks[0].shape[-2:])
            classes = torch.unique(mask)
            classes = classes[classes != IGNORE_INDEX]
            if classes.numel():
                ys, xs = torch.nonzero(mask == classes[random.randrange(classes.numel())], as_tuple=True)
                i = random.randrange(ys.numel())
                y, x = int(ys[i]), int(xs[i])
                rows = (max(rows[0], y - ch + 1), min(rows[1], y))
                cols = (max(cols[0], x - cw + 1), min(cols[1], x))
        return {"padding": [0, 0, pad_w, pad_h], "top": random.randint(*rows), "left": random.randint(*cols)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        if any(params["padding"]):
            inpt = F.pad(inpt, params["padding"], fill=_FILL[type(inpt)])
        return F.crop(inpt, params["top"], params["left"], *self.size)


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
    class_crops: float = 0.0  # share of crops placed around a class drawn uniformly from the image's


def train_transform(cfg: AugmentConfig = AugmentConfig()) -> _Pair:
    steps: list[v2.Transform] = []
    if cfg.scale != (1.0, 1.0) or cfg.base_size is not None:
        steps.append(RandomScale(cfg.scale, cfg.base_size))
    if cfg.rotation:
        steps.append(v2.RandomRotation(cfg.rotation, interpolation=v2.InterpolationMode.BILINEAR,
                                       fill=_FILL))
    if cfg.crop_size is not None:
        steps.append(ClassAwareCrop(cfg.crop_size, cfg.class_crops) if cfg.class_crops
                     else v2.RandomCrop(cfg.crop_size, pad_if_needed=True, fill=_FILL))
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.color_jitter:
        j = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.05, j / 4)))
    return _Pair(v2.Compose(steps))


def resize_transform(size: tuple[int, int]) -> _Pair:
    """Deterministic resize to (h, w) for evaluation at a fixed resolution."""
    return _Pair(v2.Resize(list(size), antialias=True))

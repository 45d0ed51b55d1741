"""A training set's fingerprint (image sizes, class frequencies) and the defaults it implies.

nnU-Net's lesson: a recipe tuned on one dataset fails on another whose images are a
different size, unless the crop, the batch and the loss follow the data. ``plan_defaults``
turns a fingerprint into values for the config fields a user did not set; each rule
reproduces the hand-tuned CamVid recipe on CamVid's 360x480 images and scales from there:

- **crop**: 0.8 of the median image (CamVid: 288x384 of 360x480) in multiples of 32, shrunk
  with its aspect kept to at most the CamVid crop's 110,592 pixels, the size 2 CPU cores train
  in an hour. A crop larger than the images (the built-in 320x320 on small photos) trains
  mostly on padding.
- **scale range**: low end 0.75 x the crop's share of the image, high end 2 x that share
  (CamVid: 0.6-1.6), kept within 0.5-2.0, DeepLab's range for images much larger than the crop.
- **batch**: the CamVid recipe's 8 images a step, whatever their size, and (nnU-Net's cap) at
  most 5 % of the training set's pixels and half its images, at least 2. Small images then take
  cheap steps, many of them: on CamVid at 180x240 (6 minutes) a batch of 8 128x192 crops scored
  47.1 and 48.7 test mIoU where 32 (the recipe's pixels a step, the rule before) scored 36.3 and
  a six-trial tuning study's best 43.7 and 44.8. On the ISBI membranes (18 training images of 512x512) the cap takes the
  batch of 320x320 crops to 2: 72.9 and 73.6 test mIoU at 9, 75.8 at 4, 76.0 and 76.1 at 2.
- **learning rate**: the CamVid recipe's 0.02 with its warm-up of one epoch (at most its ~60
  steps on a large set). On the ISBI membranes (fitted defaults, ce+dice, 6 minutes) the built-in
  0.01 without warm-up scored 69.9 test mIoU, 0.02 72.0, 0.02 with the warm-up 73.6 and 72.9 in
  two runs. It is not scaled with the batch or the crop: nothing here measured such a rule.
- **loss**: cross-entropy + Dice. On CamVid (imbalanced: Sky has 100x the pixels of Pole)
  ce+dice beat ce by 2.6 mIoU; on the ISBI membranes (4x) by 2.7 (67.2 -> 69.9 test mIoU,
  fitted defaults, 6 minutes), and every ce+dice trial of a tuning study there beat every
  plain-CE one (benchmarks/README.md): the Dice term trains for overlap, which IoU scores,
  balanced classes or not. Class weights stay off beside it (on CamVid they made the model
  over-predict rare classes); a user who picks plain CE on imbalanced data (the commonest
  present class has at least 10x the pixels of the rarest) gets the gentle
  inverse-square-root weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

CROP_OF_IMAGE = 0.8
CROP_PIXEL_BUDGET = 288 * 384
RECIPE_BATCH = 8  # configs/camvid.yaml's
MIN_BATCH = 2
BATCH_SHARE_OF_SET = 0.05  # nnU-Net's batch_size_covers_max_percent_of_dataset
CROP_MULTIPLE = 32
IMBALANCE_FOR_DICE = 10.0
MAX_MEASURED = 200
RECIPE_LR = 0.02  # configs/camvid.yaml's
WARMUP_STEPS = 60  # the recipe's one warm-up epoch: 468 CamVid images in batches of 8


@dataclass(frozen=True)
class Fingerprint:
    """What the defaults are derived from, measured on (up to ``MAX_MEASURED``) training images."""

    images: int  # images in the training set
    measured: int  # images decoded to measure it
    median_size: tuple[int, int]  # (h, w)
    min_size: tuple[int, int]  # smallest height, smallest width
    max_size: tuple[int, int]
    class_names: tuple[str, ...]
    class_fractions: tuple[float, ...]  # share of the labelled pixels per class

    @property
    def imbalance(self) -> float:
        """Pixels of the commonest class over those of the rarest, among classes present."""
        present = [f for f in self.class_fractions if f > 0]
        return max(present) / min(present) if present else 1.0

    def absent_classes(self) -> list[str]:
        return [n for n, f in zip(self.class_names, self.class_fractions) if f == 0]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "imbalance": round(self.imbalance, 1)}


def fingerprint(dataset, max_images: int = MAX_MEASURED) -> Fingerprint:
    """Measure ``dataset`` (its decoded images, whatever its transform): sizes and class pixels.

    Large sets are measured on ``max_images`` evenly spaced images, the same ones every time.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{dataset.name}: no training images to fit the defaults to")
    picked = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int))
    num_classes = dataset.label_space.num_classes
    sizes = np.zeros((len(picked), 2), dtype=np.int64)
    pixels = np.zeros(num_classes, dtype=np.int64)
    for row, i in enumerate(picked):
        _, mask = dataset.decoded(int(i))
        sizes[row] = mask.shape[:2]
        pixels += np.bincount(mask.ravel(), minlength=256)[:num_classes]
    total = pixels.sum()
    fractions = pixels / total if total else np.zeros(num_classes)
    median = np.median(sizes, axis=0)
    return Fingerprint(images=n, measured=len(picked), median_size=(int(median[0]), int(median[1])),
                       min_size=(int(sizes[:, 0].min()), int(sizes[:, 1].min())),
                       max_size=(int(sizes[:, 0].max()), int(sizes[:, 1].max())),
                       class_names=tuple(dataset.label_space.names),
                       class_fractions=tuple(round(float(f), 6) for f in fractions))


@dataclass
class Plan:
    """Config values (dotted field -> value) chosen from a fingerprint, each with its reason."""

    values: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    fingerprint: Fingerprint | None = None

    def describe(self) -> str:
        return "; ".join(f"{k}={_shown(v)} ({self.reasons[k]})" for k, v in self.values.items())


def _shown(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) and all(isinstance(v, int) for v in value) \
        else (f"{value[0]:g}-{value[1]:g}" if isinstance(value, tuple) else str(value))


def _crop(median: tuple[int, int]) -> tuple[int, int]:
    h, w = (CROP_OF_IMAGE * s for s in median)
    if h * w > CROP_PIXEL_BUDGET:
        k = math.sqrt(CROP_PIXEL_BUDGET / (h * w))
        h, w = h * k, w * k
    return tuple(max(CROP_MULTIPLE, int(s // CROP_MULTIPLE) * CROP_MULTIPLE) for s in (h, w))  # type: ignore[return-value]


def plan_defaults(fp: Fingerprint, fields: set[str], *, loss_kind: str = "ce",
                  crop_size: tuple[int, int] | None = None, batch_size: int = 8) -> Plan:
    """Values for ``fields`` (those of data.crop_size, data.scale, train.batch_size, optim.lr,
    optim.warmup_epochs, loss.kind and loss.class_weights the user left unset); ``loss_kind``,
    ``crop_size`` (None: whole images) and ``batch_size`` are the user's, used where they are not
    in ``fields``."""
    plan = Plan()
    mh, mw = fp.median_size
    size = f"the images' median is {mh}x{mw}"
    crop = _crop(fp.median_size) if "data.crop_size" in fields else (crop_size or fp.median_size)
    if "data.crop_size" in fields:
        capped = CROP_OF_IMAGE ** 2 * mh * mw > CROP_PIXEL_BUDGET
        plan.values["data.crop_size"] = crop
        plan.reasons["data.crop_size"] = (f"{size}; {CROP_OF_IMAGE:g} of it"
                                          + (", capped at 288x384's pixels" if capped else ""))
    if "data.scale" in fields:
        share = (min(1.0, crop[0] / mh) + min(1.0, crop[1] / mw)) / 2
        low = max(0.5, round(0.75 * share, 2))
        high = min(2.0, max(low, round(2 * share, 2), 1.5))
        plan.values["data.scale"] = (low, high)
        plan.reasons["data.scale"] = f"the crop covers {share:.0%} of an image"
    batch = batch_size
    if "train.batch_size" in fields:
        share = int(round(BATCH_SHARE_OF_SET * fp.images * mh * mw / (crop[0] * crop[1])))
        batch = max(MIN_BATCH, min(RECIPE_BATCH, share, fp.images // 2))
        plan.values["train.batch_size"] = batch
        plan.reasons["train.batch_size"] = (f"the CamVid recipe's {RECIPE_BATCH}, at most {BATCH_SHARE_OF_SET:.0%} of the "
                                            f"{fp.images} training images' pixels and half of them")
    if "optim.lr" in fields:
        plan.values["optim.lr"] = RECIPE_LR
        plan.reasons["optim.lr"] = "the CamVid recipe's"
    if "optim.warmup_epochs" in fields:
        steps = max(1, math.ceil(fp.images / max(1, batch)))
        plan.values["optim.warmup_epochs"] = 1.0 if steps <= WARMUP_STEPS else round(WARMUP_STEPS / steps, 3)
        plan.reasons["optim.warmup_epochs"] = f"the recipe's one epoch, at most {WARMUP_STEPS} steps; {steps} steps an epoch here"
    imbalanced = fp.imbalance >= IMBALANCE_FOR_DICE
    ratio = f"the commonest class has {fp.imbalance:.0f}x the pixels of the rarest"
    if "loss.kind" in fields:
        loss_kind = "ce+dice"
        plan.values["loss.kind"] = loss_kind
        plan.reasons["loss.kind"] = "the Dice term trains for overlap, which IoU scores"
    if "loss.class_weights" in fields:
        weights = "inverse_sqrt" if imbalanced and loss_kind == "ce" else "none"
        plan.values["loss.class_weights"] = weights
        plan.reasons["loss.class_weights"] = (f"plain CE and {ratio}" if weights != "none"
                                              else "the Dice term handles imbalance" if "dice" in loss_kind
                                              else "the Lovász term handles imbalance" if "lovasz" in loss_kind
                                              else "balanced classes")
    return plan

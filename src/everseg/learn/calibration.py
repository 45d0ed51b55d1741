"""Bias offsets that make new classes predict as many pixels as they hold.

A class-incremental step trains only on images that hold its new classes, and the Dice and
Lovász terms of the recipe reward recall; the step ends with its new classes over-predicted
(camvid-6-1, MiB: Pedestrian on 1.24x its true pixels on the step's own images and 1.49x on
the test images; benchmarks/README.md). Shifting a class's classifier bias moves the
decision boundary between it and every other class without touching what the model learned,
so the step's own labelled images give the offset: the one at which each new class is
predicted on as many labelled pixels as it truly covers there.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from everseg.evaluate.inference import predict_logits

log = logging.getLogger(__name__)

# Pixels kept per image, every PIXEL_STRIDE-th each way: counts are matched on a uniform
# sample, a quarter of the memory of whole images.
PIXEL_STRIDE = 2
# The offset's bound: a class whose count can only be matched by a larger shift is one the
# step barely learned (or one the sample barely holds); moving its bias that far would decide
# it from a few pixels.
MAX_OFFSET = 3.0
# Several classes are matched in turns until no offset moves by more than this (logit units):
# far below what changes a decision on more than a handful of pixels.
TOLERANCE = 1e-3


def sample_images(dataset: Any, max_images: int) -> list[int]:
    """Indices of at most ``max_images`` images spread evenly over ``dataset``."""
    n = len(dataset)
    if n <= max_images:
        return list(range(n))
    return [round(i * n / max_images) for i in range(max_images)]


@torch.no_grad()
def count_matching_offsets(model: nn.Module, dataset: Any, class_ids: Sequence[int], *,
                           max_images: int = 64, max_rounds: int = 50, autocast_bf16: bool = False,
                           channels_last: bool = False) -> dict[int, float]:
    """Offsets to add to the logits of ``class_ids`` so that, on (up to ``max_images`` of)
    ``dataset``'s images, each is the predicted class of as many labelled pixels as its masks
    give it. ``dataset`` yields ``{"image": uint8 3 x H x W, "mask": int64 H x W}`` (255 =
    unlabelled), untransformed. Classes that no sampled pixel holds get no offset. With several
    classes each offset depends on the others': passes of matching one class at a time, the
    others' offsets held, until no offset moves by more than ``TOLERANCE`` (at most
    ``max_rounds``)."""
    class_ids = [int(c) for c in class_ids]
    logits, labels = [], []
    for i in sample_images(dataset, max_images):
        item = dataset[i]
        z = predict_logits(model, item["image"], autocast_bf16=autocast_bf16, channels_last=channels_last)
        z = z[:, ::PIXEL_STRIDE, ::PIXEL_STRIDE].flatten(1)
        m = torch.as_tensor(item["mask"])[::PIXEL_STRIDE, ::PIXEL_STRIDE].flatten().to(z.device)
        keep = m != 255
        logits.append(z[:, keep])
        labels.append(m[keep])
    if not logits:
        return {}
    z = torch.cat(logits, dim=1)  # C x pixels
    y = torch.cat(labels)
    n = y.numel()
    offsets = torch.zeros(z.shape[0], device=z.device)
    present = [c for c in class_ids if 0 < int((y == c).sum()) < n]
    for _ in range(max_rounds if len(present) > 1 else 1):
        moved = 0.0
        for c in present:
            shifted = z + offsets[:, None]
            others = torch.cat([shifted[:c], shifted[c + 1:]]).max(dim=0).values
            margin = z[c] - others  # c wins where margin + offset > 0
            true = int((y == c).sum())
            # the offset that puts exactly `true` margins above zero: minus the (n - true)-th
            # smallest margin, halfway to the next so that ties do not decide it
            low = torch.kthvalue(margin, n - true).values
            high = torch.kthvalue(margin, n - true + 1).values
            offset = float((-(low + high) / 2).clamp(-MAX_OFFSET, MAX_OFFSET))
            moved = max(moved, abs(offset - float(offsets[c])))
            offsets[c] = offset
        if moved < TOLERANCE:
            break
    return {c: float(offsets[c]) for c in present}


@torch.no_grad()
def shift_class_biases(model: nn.Module, offsets: dict[int, float]) -> None:
    """Add ``offsets`` to the classifier biases of an everseg model (``model.classifier``)."""
    bias = model.classifier.bias
    for c, d in offsets.items():
        bias[c] += d


__all__ = ["count_matching_offsets", "sample_images", "shift_class_biases"]

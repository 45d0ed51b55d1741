"""Segmentation losses: cross-entropy (ignore index, class weights), soft Dice, Lovász-softmax
and their sums.

The recipe's loss is built once (:class:`SegmentationLoss`); incremental-learning strategies
shape it for each batch through one object, :class:`LossShape`, rather than replacing it, so
that two strategies that both change it are both applied and the recipe's Dice term, class
weights and label smoothing survive every combination.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from everseg.data.labelspace import IGNORE_INDEX
from everseg.learn.config import LossConfig


class DiceLoss(nn.Module):
    """1 - mean soft Dice over the classes present in the batch's truth.

    Ignored pixels count neither in the prediction nor in the truth. Averaging over
    present classes only keeps an absent class from rewarding an empty prediction.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, smooth: float = 1.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor, background_covers: int = 1) -> torch.Tensor:
        n_cls = logits.shape[1]
        valid = target != self.ignore_index
        labels = torch.where(valid, target, 0)
        probs = _merge_background(logits.float().softmax(1), background_covers)
        weight = valid.to(probs.dtype)
        # No one-hot tensor: at batch 8 x 11 classes x 288x384 building it (int64) and
        # multiplying through it cost 300 ms a step, a fifth of a training step on 2 cores;
        # this form costs about 110 ms.
        # The intersection only needs each pixel's probability of its true class.
        p_true = probs.gather(1, labels.unsqueeze(1)).squeeze(1) * weight
        inter = p_true.new_zeros(n_cls).scatter_add(0, labels.flatten(), p_true.flatten())
        pred = (probs * weight.unsqueeze(1)).sum((0, 2, 3))
        if background_covers > 1:
            # A pixel labelled 0 may be any of the old classes it stands for: it counts against
            # none of them (else an old class that replayed or pseudo-labelled pixels make present
            # is taught away from every step pixel that shows it).
            k = background_covers
            unsure = (probs[:, 1:k] * (weight * (labels == 0)).unsqueeze(1)).sum((0, 2, 3))
            pred = torch.cat([pred[:1], pred[1:k] - unsure, pred[k:]])
        truth = torch.bincount(labels[valid], minlength=n_cls).to(probs.dtype)
        dice = (2 * inter + self.smooth) / (pred + truth + self.smooth)
        present = truth > 0
        return 1.0 - dice[present].mean() if present.any() else logits.sum() * 0.0


def _merge_background(probs: torch.Tensor, background_covers: int) -> torch.Tensor:
    """Label 0 = background or an old class: its probability is their sum (MiB's unbiased form)."""
    if background_covers <= 1:
        return probs
    return torch.cat([probs[:, :background_covers].sum(1, keepdim=True), probs[:, 1:]], dim=1)


class LovaszSoftmaxLoss(nn.Module):
    """Berman et al.'s Lovász-softmax (CVPR 2018): a convex surrogate of 1 - IoU for each class
    present in the batch's truth, averaged over them.

    The IoU is the batch's (the paper's batch form, nearer a dataset mIoU than per-image IoUs),
    estimated on a grid of pixels: the exact loss sorts every pixel's error once per class,
    which at batch 8 x 11 classes of 288x384 took 1.8 s forward and backward on one core, more
    than a whole training step on two; on every 4th pixel each way (at most ``max_pixels`` a
    batch, from a random offset) it takes 0.1 s, and counts over a uniform subset estimate the
    batch's intersection and union.
    Ignored pixels do not count.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, max_pixels: int = 1 << 16):
        super().__init__()
        self.ignore_index = ignore_index
        self.max_pixels = max_pixels

    def forward(self, logits: torch.Tensor, target: torch.Tensor, background_covers: int = 1) -> torch.Tensor:
        n, _, h, w = logits.shape
        stride = max(1, math.ceil(math.sqrt(n * h * w / self.max_pixels)))
        if stride > 1:
            dy, dx = (int(v) for v in torch.randint(0, stride, (2,)))
            logits, target = logits[:, :, dy::stride, dx::stride], target[:, dy::stride, dx::stride]
        probs = _merge_background(logits.float().softmax(1), background_covers)
        valid = target != self.ignore_index
        labels = target[valid]
        if labels.numel() == 0:
            return logits.sum() * 0.0
        probs = probs.permute(1, 0, 2, 3)[:, valid]  # classes x valid pixels
        classes = torch.bincount(labels, minlength=probs.shape[0]).nonzero().squeeze(1)
        truth = (labels.unsqueeze(0) == classes.unsqueeze(1)).to(probs.dtype)
        errors = (truth - probs[classes]).abs()
        if background_covers > 1:
            # As in the Dice term: a pixel labelled 0 is no error for an old class it may be.
            # (An error of 0 sorts last and adds nothing to the loss or to the others' weights.)
            old = (classes >= 1) & (classes < background_covers)
            errors = errors.masked_fill(old.unsqueeze(1) & (labels == 0).unsqueeze(0), 0.0)
        errors, order = errors.sort(dim=1, descending=True)
        truth = truth.gather(1, order)
        # The Lovász extension's gradient: the Jaccard loss of the k largest errors, differenced.
        total = truth.sum(1, keepdim=True)
        jaccard = 1.0 - (total - truth.cumsum(1)) / (total + (1.0 - truth).cumsum(1))
        steps = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
        return (errors * steps).sum(1).mean()


@dataclass
class LossShape:
    """How plugins shape the recipe's segmentation loss for one batch (``Plugin.shape_loss``).

    Every field composes, so a combination of strategies means all of them:

    - ``image_weights`` (N): each image's cross-entropy is its own class-weighted mean,
      multiplied by its weight, and the batch's loss is the mean over images; two strategies
      that weight images multiply their weights. The Dice and Lovász terms, batch-level
      overlaps, are not weighted.
    - ``background_covers`` (k): label 0 stands for "background or one of classes 1..k-1"
      (MiB's unbiased loss, for a step whose background hides the old classes): its
      cross-entropy uses the summed probability of those classes, and so do its Dice and
      Lovász terms, where a pixel labelled 0 counts against none of classes 1..k-1.
      Set once per batch; two different values are refused.
    """

    image_weights: torch.Tensor | None = None
    background_covers: int = 1
    weighted_by: list[str] = field(default_factory=list)  # who weighted the images, in order

    def weight_images(self, weights: torch.Tensor, who: str) -> None:
        self.image_weights = weights if self.image_weights is None else self.image_weights * weights
        self.weighted_by.append(who)

    def merge_background(self, classes: int, who: str) -> None:
        if self.background_covers not in (1, classes):
            raise ValueError(f"{who}: label 0 already stands for classes 0..{self.background_covers - 1}; "
                             f"it cannot also stand for 0..{classes - 1}")
        self.background_covers = classes

    @property
    def plain(self) -> bool:
        return self.image_weights is None and self.background_covers <= 1


LOSS_KINDS: tuple[str, ...] = get_args(LossConfig.model_fields["kind"].annotation)


class SegmentationLoss(nn.Module):
    """``kind`` = one of :data:`LOSS_KINDS`, the sum of its terms; CE ignores ``ignore_index`` and
    can weight classes, the Dice and Lovász terms are weighted by ``dice_weight`` and
    ``lovasz_weight``.

    ``class_weights`` may be replaced between steps (replay recomputes them over its memory).
    """

    def __init__(self, kind: str = "ce", *, class_weights: torch.Tensor | None = None,
                 ignore_index: int = IGNORE_INDEX, dice_weight: float = 1.0, lovasz_weight: float = 1.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss {kind!r}; choose {', '.join(LOSS_KINDS)}")
        self.kind = kind
        self.terms = set(kind.split("+"))
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight
        self.lovasz_weight = lovasz_weight
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.dice = DiceLoss(ignore_index)
        self.lovasz = LovaszSoftmaxLoss(ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, shape: LossShape | None = None) -> torch.Tensor:
        shape = shape if shape is not None and not shape.plain else None
        covers = shape.background_covers if shape is not None else 1
        loss = logits.new_zeros((), dtype=torch.float32)
        if "ce" in self.terms:
            loss = loss + self.cross_entropy(logits, target, shape)
        if "dice" in self.terms:
            loss = loss + self.dice_weight * self.dice(logits, target, background_covers=covers)
        if "lovasz" in self.terms:
            loss = loss + self.lovasz_weight * self.lovasz(logits, target, background_covers=covers)
        return loss

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor, shape: LossShape | None = None
                      ) -> torch.Tensor:
        """The cross-entropy term alone, with this loss's class weights, label smoothing and
        ignored label, under ``shape`` (whatever ``kind`` says: the auxiliary head's loss)."""
        if shape is not None and not shape.plain:
            return self._shaped_ce(logits, target, shape)
        return F.cross_entropy(logits.float(), target, weight=self.class_weights,
                               ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def _shaped_ce(self, logits: torch.Tensor, target: torch.Tensor, shape: LossShape) -> torch.Tensor:
        """``F.cross_entropy`` (same class weighting and label smoothing) under ``shape``."""
        log_p = logits.float().log_softmax(1)
        k = shape.background_covers
        if k > 1:
            log_p = torch.cat([torch.logsumexp(log_p[:, :k], dim=1, keepdim=True), log_p[:, 1:]], dim=1)
        valid = target != self.ignore_index
        safe = torch.where(valid, target, 0)
        nll = -log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
        weight = valid.float()
        if self.class_weights is not None:
            cw = self.class_weights.to(logits.device)
            weight = weight * cw[safe]
        per_pixel = weight * nll
        if self.label_smoothing:
            eps = self.label_smoothing
            spread = -(log_p if self.class_weights is None else log_p * cw.view(1, -1, 1, 1)).mean(1)
            per_pixel = (1 - eps) * per_pixel + eps * valid.float() * spread
        if shape.image_weights is None:
            return per_pixel.sum() / weight.sum().clamp_min(1e-12)
        per_image = per_pixel.flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-12)
        return (shape.image_weights.to(per_image) * per_image).mean()


def class_frequencies(per_image_counts: np.ndarray) -> np.ndarray:
    """SegNet's frequency: pixels of c / pixels of the images where c appears."""
    counts = per_image_counts.astype(np.float64)
    image_totals = counts.sum(1, keepdims=True)
    present = counts > 0
    denom = (image_totals * present).sum(0)
    return np.divide(counts.sum(0), denom, out=np.zeros(counts.shape[1]), where=denom > 0)


def compute_class_weights(per_image_counts: np.ndarray, method: str | Sequence[float],
                          max_weight: float = 10.0) -> torch.Tensor | None:
    """Class weights for CE from per-image class pixel counts (images x classes).

    ``median_frequency`` is Eigen & Fergus (2015): median(freq) / freq(c).
    ``inverse_sqrt`` is the gentler 1/sqrt(freq), scaled to mean 1.
    Classes never seen get weight 1; all weights are clipped to ``max_weight``.
    """
    n = per_image_counts.shape[1]
    if not isinstance(method, str):
        if len(method) != n:
            raise ValueError(f"class_weights lists {len(method)} values for {n} classes")
        return torch.tensor(list(method), dtype=torch.float32)
    if method == "none":
        return None
    freq = class_frequencies(per_image_counts)
    seen = freq > 0
    w = np.ones(n)
    if method == "median_frequency":
        w[seen] = np.median(freq[seen]) / freq[seen]
    elif method == "inverse_sqrt":
        w[seen] = 1.0 / np.sqrt(freq[seen])
        w[seen] /= w[seen].mean()
    else:
        raise ValueError(f"unknown class weighting {method!r}")
    return torch.tensor(np.clip(w, 0.0, max_weight), dtype=torch.float32)

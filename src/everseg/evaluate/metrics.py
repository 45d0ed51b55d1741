"""Segmentation scores computed from a confusion matrix.

With ``M`` the confusion matrix (rows = truth, columns = prediction),
``TP = diag(M)``, ``T = row sums`` (true pixels per class) and
``P = column sums`` (predicted pixels per class):

================  ================================  ==========================
metric            formula                           undefined (NaN) when
================  ================================  ==========================
IoU (Jaccard)     TP / (T + P - TP)                 class absent from truth
                                                    *and* prediction
Dice (F1)         2 TP / (T + P)                    same as IoU
precision         TP / P                            class never predicted
recall            TP / T                            class absent from truth
class accuracy    = recall
pixel accuracy    sum(TP) / sum(T)                  no pixels counted
================  ================================  ==========================

The rule is the same everywhere: a ratio whose denominator is zero is NaN
("no evidence"), never 0 and never 1. A class that appears only in the
prediction therefore gets IoU 0 (it cost false positives), while a class that
appears in neither gets NaN and is **left out of every mean**: ``miou`` and
``mean_dice`` average over classes with a defined value, and
``mean_class_accuracy`` averages recall over classes present in the truth.
Frequency-weighted IoU weighs each class's IoU by its share of true pixels,
so classes absent from the truth carry no weight.

Every score is in **percent** (0-100), on the object as in the tables, JSON files and
command-line output of everseg: one unit everywhere. :meth:`SegmentationMetrics.to_dict`
writes NaN as JSON ``null``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from everseg.data.labelspace import LabelSpace

__all__ = ["SegmentationMetrics", "class_names_for"]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, NaN where ``den == 0``."""
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (without a warning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def class_names_for(num_classes: int, label_space: "LabelSpace | None") -> tuple[str, ...]:
    """The class names of ``label_space``, or ``"0", "1", ...`` when it is None.

    Raises ``ValueError`` when the label space has a different number of classes.
    """
    if label_space is None:
        return tuple(str(i) for i in range(num_classes))
    if label_space.num_classes != num_classes:
        raise ValueError(
            f"label space has {label_space.num_classes} classes but the metrics have {num_classes}"
        )
    return tuple(label_space.names)


@dataclass(frozen=True, eq=False)
class SegmentationMetrics:
    """All scores of one evaluation; per-class arrays are float64 of length ``num_classes``.

    Build it with :meth:`from_confusion` (or ``ConfusionMatrix.compute()``).
    Percent (0-100); NaN marks an undefined value (see the module docstring).
    """

    confusion: np.ndarray  # int64 num_classes x num_classes, rows = truth, cols = prediction
    iou: np.ndarray  # per-class intersection over union
    dice: np.ndarray  # per-class Dice coefficient (= F1 score)
    precision: np.ndarray  # per-class TP / predicted pixels
    recall: np.ndarray  # per-class TP / true pixels (= class accuracy)
    pixel_accuracy: float  # correctly labelled pixels / all counted pixels
    mean_class_accuracy: float  # mean recall over classes present in the truth
    miou: float  # mean IoU over classes with a defined IoU
    mean_dice: float  # mean Dice over classes with a defined Dice
    fwiou: float  # IoU weighted by each class's share of true pixels
    num_pixels: int  # pixels counted (ignore pixels excluded)

    @classmethod
    def from_confusion(cls, matrix: Any, classes: Iterable[int] | None = None) -> "SegmentationMetrics":
        """Compute every score from a square count matrix (torch tensor, numpy array or list).

        ``classes``: the class ids to score (default all). The others get NaN everywhere and
        so stay out of every mean: a model that knows more classes than the data labels
        (a background class added by incremental learning) is scored on the data's classes.
        """
        if isinstance(matrix, torch.Tensor):
            m = matrix.detach().cpu().to(torch.int64).numpy()
        else:
            m = np.asarray(matrix)
            if m.dtype.kind not in "iu":
                if not np.all(np.equal(np.mod(m, 1), 0)):
                    raise ValueError("confusion matrix must hold whole pixel counts")
            m = m.astype(np.int64)
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
            raise ValueError(f"confusion matrix must be square and non-empty, got shape {m.shape}")
        if (m < 0).any():
            raise ValueError("confusion matrix holds negative counts")

        tp = np.diag(m).astype(np.float64)
        true_px = m.sum(axis=1).astype(np.float64)
        pred_px = m.sum(axis=0).astype(np.float64)
        total = float(true_px.sum())

        iou = 100.0 * _ratio(tp, true_px + pred_px - tp)
        dice = 100.0 * _ratio(2.0 * tp, true_px + pred_px)
        precision = 100.0 * _ratio(tp, pred_px)
        recall = 100.0 * _ratio(tp, true_px)
        if classes is not None:
            unscored = np.ones(m.shape[0], dtype=bool)
            unscored[np.asarray(list(classes), dtype=np.int64)] = False
            for values in (iou, dice, precision, recall):
                values[unscored] = np.nan

        if total > 0:
            freq = true_px / total
            present = true_px > 0  # IoU is defined for all of these
            fwiou = float(np.nansum(freq[present] * iou[present]))
            pixel_accuracy = float(100.0 * tp.sum() / total)
        else:
            fwiou = pixel_accuracy = math.nan

        return cls(
            confusion=m,
            iou=iou,
            dice=dice,
            precision=precision,
            recall=recall,
            pixel_accuracy=pixel_accuracy,
            mean_class_accuracy=_nanmean(recall),
            miou=_nanmean(iou),
            mean_dice=_nanmean(dice),
            fwiou=fwiou,
            num_pixels=int(m.sum()),
        )

    # ------------------------------------------------------------------ helpers
    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    @property
    def class_accuracy(self) -> np.ndarray:
        """Per-class accuracy; the same numbers as :attr:`recall`."""
        return self.recall

    @property
    def true_pixels(self) -> np.ndarray:
        """Per-class count of pixels whose truth is that class."""
        return self.confusion.sum(axis=1)

    @property
    def predicted_pixels(self) -> np.ndarray:
        """Per-class count of pixels predicted as that class."""
        return self.confusion.sum(axis=0)

    def mean_iou(self, classes: Iterable[int] | None = None) -> float:
        """Mean IoU over ``classes`` (all when None), skipping undefined (NaN) ones.

        Handy for the old / new class split of incremental learning.
        """
        if classes is None:
            return self.miou
        idx = np.asarray(list(classes), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_classes):
            raise IndexError(f"class ids {idx.tolist()} outside [0, {self.num_classes})")
        return _nanmean(self.iou[idx])

    def to_dict(self, label_space: "LabelSpace | None" = None, *,
                include_confusion: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (percent values, 0-100); undefined values are ``None``.

        Per-class entries are ``{class name: value}`` in class order; without a
        label space the names are the class ids as strings.
        """
        names = class_names_for(self.num_classes, label_space)

        def per_class(values: Sequence[float]) -> dict[str, float | None]:
            return {name: _json_number(v) for name, v in zip(names, values)}

        out: dict[str, Any] = {
            "miou": _json_number(self.miou),
            "mean_dice": _json_number(self.mean_dice),
            "pixel_accuracy": _json_number(self.pixel_accuracy),
            "mean_class_accuracy": _json_number(self.mean_class_accuracy),
            "fwiou": _json_number(self.fwiou),
            "num_pixels": self.num_pixels,
            "num_classes": self.num_classes,
            "per_class_iou": per_class(self.iou),
            "per_class_dice": per_class(self.dice),
            "per_class_precision": per_class(self.precision),
            "per_class_recall": per_class(self.recall),
            "per_class_pixels": {n: int(c) for n, c in zip(names, self.true_pixels)},
        }
        if include_confusion:
            out["confusion_matrix"] = self.confusion.tolist()
        return out

    def __repr__(self) -> str:
        def f(x: float) -> str:
            return "nan" if math.isnan(x) else f"{x:.2f}%"

        return (f"SegmentationMetrics(miou={f(self.miou)}, mean_dice={f(self.mean_dice)}, "
                f"pixel_accuracy={f(self.pixel_accuracy)}, num_classes={self.num_classes}, "
                f"num_pixels={self.num_pixels})")


"""A running confusion matrix for semantic segmentation.

Every metric in :mod:`everseg.evaluate.metrics` is a function of one ``n x n``
count matrix, so evaluation only has to accumulate that matrix: one
``bincount`` of ``target * n + pred`` per batch, on whatever device the
predictions live on. Counts are int64, so they do not saturate on large
datasets, and they can be summed across processes before the metrics are
computed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from everseg.evaluate.metrics import SegmentationMetrics

__all__ = ["ConfusionMatrix"]


def _as_long_tensor(x: Any, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    return t.to(torch.int64)


class ConfusionMatrix:
    """Pixel counts of (true class, predicted class) pairs.

    ``matrix[i, j]`` is the number of pixels whose truth is class ``i`` and
    whose prediction is class ``j`` (rows = truth, columns = prediction).
    Pixels whose truth equals ``ignore_index`` are left out.

    >>> cm = ConfusionMatrix(3)
    >>> cm.update(pred, target)   # any matching shapes, e.g. N x H x W
    >>> cm.compute().miou   # percent, like every score in everseg
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 device: torch.device | str | None = None) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64,
                                   device=device)

    # ------------------------------------------------------------------ counting
    @property
    def matrix(self) -> torch.Tensor:
        """The ``num_classes x num_classes`` int64 counts (rows = truth, cols = prediction)."""
        return self._matrix

    @property
    def num_pixels(self) -> int:
        """How many (non-ignored) pixels have been counted."""
        return int(self._matrix.sum())

    @torch.no_grad()
    def update(self, pred: Any, target: Any) -> "ConfusionMatrix":
        """Count the pixels of one batch.

        ``pred`` and ``target`` are integer class ids of the same shape (any
        shape: ``H x W``, ``N x H x W``, flat, ...). Target pixels equal to
        ``ignore_index`` are dropped. Raises ``ValueError`` when a target label
        (other than the ignore index) or a prediction lies outside
        ``[0, num_classes)``: that means a label-space mismatch, and silently
        skipping those pixels would flatter the scores.
        """
        pred = _as_long_tensor(pred, "pred")
        target = _as_long_tensor(target, "target")
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.device != target.device:
            target = target.to(pred.device)
        if self._matrix.device != pred.device:
            self._matrix = self._matrix.to(pred.device)

        n = self.num_classes
        keep = target != self.ignore_index
        t = target[keep]
        p = pred[keep]
        if t.numel() == 0:
            return self
        bad_t = (t < 0) | (t >= n)
        if bool(bad_t.any()):
            values = torch.unique(t[bad_t]).tolist()[:10]
            raise ValueError(
                f"target holds labels {values} outside [0, {n}) that are not the ignore "
                f"index {self.ignore_index}; the dataset and the model disagree on the classes"
            )
        bad_p = (p < 0) | (p >= n)
        if bool(bad_p.any()):
            values = torch.unique(p[bad_p]).tolist()[:10]
            raise ValueError(f"pred holds class ids {values} outside [0, {n})")
        counts = torch.bincount(t * n + p, minlength=n * n)
        self._matrix += counts.reshape(n, n)
        return self

    def reset(self) -> None:
        """Set every count back to zero."""
        self._matrix.zero_()

    # ------------------------------------------------------------------ combining
    def _check_compatible(self, other: "ConfusionMatrix") -> None:
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge ConfusionMatrix with {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) "
                f"into a {self.num_classes}-class one (ignore {self.ignore_index})"
            )

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """A new matrix holding the counts of both (neither input changes)."""
        self._check_compatible(other)
        out = ConfusionMatrix(self.num_classes, self.ignore_index, device=self._matrix.device)
        out._matrix = self._matrix + other._matrix.to(self._matrix.device)
        return out

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self._check_compatible(other)
        self._matrix += other._matrix.to(self._matrix.device)
        return self

    def reduce_across_processes(self) -> "ConfusionMatrix":
        """Sum the counts over all processes of the default group, in place.

        A no-op unless ``torch.distributed`` is available and initialised, so it
        is safe to call unconditionally at the end of an evaluation loop.
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._matrix, op=dist.ReduceOp.SUM)
        return self

    # ------------------------------------------------------------------ results
    def compute(self, classes: Iterable[int] | None = None) -> "SegmentationMetrics":
        """IoU, Dice, precision, recall and the rest, from the counts so far (over ``classes``,
        default all: see :meth:`SegmentationMetrics.from_confusion`)."""
        from everseg.evaluate.metrics import SegmentationMetrics

        return SegmentationMetrics.from_confusion(self._matrix, classes)

    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "matrix": self._matrix.cpu().clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ConfusionMatrix":
        cm = cls(int(state["num_classes"]), int(state["ignore_index"]))
        matrix = torch.as_tensor(state["matrix"], dtype=torch.int64)
        if matrix.shape != cm._matrix.shape:
            raise ValueError(f"matrix shape {tuple(matrix.shape)} does not match num_classes")
        cm._matrix = matrix.clone()
        return cm

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"num_pixels={self.num_pixels})")

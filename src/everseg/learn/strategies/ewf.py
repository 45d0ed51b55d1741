"""EWF: Endpoints Weight Fusion (Xiao et al., CVPR 2023).

A step that adds classes trains as usual (with any other strategy: MiB and PLOP in the
paper), the old classes' classifier rows held where the step started. Afterwards every
weight the old model has - batch-norm statistics included - becomes an average of its two
endpoints, ``(1 - r) old + r new`` with ``r = sqrt(new classes / classes now)``: the fewer
classes a step adds, the more of the old model is kept. The new classes' rows are kept as
trained. The step is free to move far from the old model to learn the new classes; the
fusion then brings back what the old ones need.

Steps that add no class (new data of the same classes) are left alone: there ``r`` would be 0
and the fusion would undo the step.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from everseg.learn.strategies.base import Strategy

log = logging.getLogger(__name__)


def fuse_endpoints(model: nn.Module, old: nn.Module, ratio: float) -> None:
    """``model``'s weights := ``(1 - ratio) old + ratio model`` wherever ``old`` has them; the rows of a
    grown tensor (a classifier's new classes) that ``old`` lacks keep ``model``'s values."""
    old_state = old.state_dict()
    state = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            before = old_state.get(name)
            if before is None or not value.is_floating_point():
                continue  # e.g. batch-norm's step counters
            before = before.to(device=value.device, dtype=value.dtype)
            if before.shape == value.shape:
                value.copy_(torch.lerp(before, value, ratio))
            elif value.dim() and before.shape[1:] == value.shape[1:] and before.shape[0] < value.shape[0]:
                rows = before.shape[0]
                value[:rows].copy_(torch.lerp(before, value[:rows], ratio))


class EWF(Strategy):
    """Endpoints Weight Fusion after each step that adds classes; combine it with a strategy that
    trains the step (``mib+ewf``, ``plop+ewf``).

    Args:
        ratio: the new model's share in the fusion; 0 = the paper's sqrt(new classes / classes now).
        freeze_old_classifier: hold the old classes' classifier rows during the step (paper: on).
    """

    name = "ewf"

    def __init__(self, ratio: float = 0.0, freeze_old_classifier: bool = True):
        super().__init__()
        if not 0 <= ratio <= 1:
            raise ValueError(f"hyper-parameter ewf.ratio={ratio}: must be in [0, 1] (0 = the paper's rule)")
        self.ratio, self.freeze_old_classifier = ratio, freeze_old_classifier
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def _applies(self) -> bool:
        if self.ctx is None or self.old_model is None:
            return False
        return bool(self.ctx.step.new_classes)

    def fusion_ratio(self, classes_now: int) -> float:
        if self.ratio:
            return self.ratio
        old = self.ctx.old_num_classes
        return math.sqrt((classes_now - old) / classes_now)

    def on_fit_start(self, trainer) -> None:
        self._rows = None
        if not self._applies():
            if self.old_model is not None:
                log.info("ewf: this step adds no class; its model is kept as trained, not fused")
            return
        if self.freeze_old_classifier:
            head, old = trainer.model.classifier, self.ctx.old_num_classes
            self._rows = (head.weight[:old].detach().clone(), head.bias[:old].detach().clone())

    @torch.no_grad()
    def after_step(self, trainer, batch, output) -> None:
        if self._rows is not None:
            head, old = trainer.model.classifier, self.ctx.old_num_classes
            head.weight[:old].copy_(self._rows[0])
            head.bias[:old].copy_(self._rows[1])

    def end_step(self, ctx, trainer) -> None:
        if not self._applies():
            return
        ratio = self.fusion_ratio(trainer.model.num_classes)
        fuse_endpoints(trainer.model, self.old_model, ratio)
        log.info("ewf: fused the step's model with the previous one, %.0f%% new", 100 * ratio)


__all__ = ["EWF", "fuse_endpoints"]

"""MiB: Modeling the Background (Cermelli et al., CVPR 2020).

In step t the background label covers old classes too (the background shift). MiB
therefore (1) scores a background pixel by the probability of "background or any old
class" (unbiased cross-entropy; here the recipe's own loss shaped by
:class:`~everseg.learn.losses.LossShape`, so its Dice term, class weights and label
smoothing are kept and made unbiased too), (2) distils the old model into "background or any new
class" for its background (unbiased distillation), and (3) starts new classifier rows
as copies of the background row (``Segmenter.grow_classifier(init="background")``).
"""

from __future__ import annotations

import logging

import torch

from everseg.learn.plugins import Batch, StepOutput
from everseg.learn.strategies.base import Strategy

log = logging.getLogger(__name__)


def unbiased_distillation(new_logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """``-1/|old| sum_c q_c log p^_c``, averaged over pixels, where the new model's background
    probability is that of "background or any new class" (log-sum-exp over those logits)."""
    n_old = old_logits.shape[1]
    new_logits = new_logits.float()
    denom = torch.logsumexp(new_logits, dim=1, keepdim=True)
    bg_or_new = torch.cat([new_logits[:, :1], new_logits[:, n_old:]], dim=1)
    log_bg = torch.logsumexp(bg_or_new, dim=1, keepdim=True) - denom
    log_old = new_logits[:, 1:n_old] - denom
    log_hat = torch.cat([log_bg, log_old], dim=1)
    q = old_logits.float().softmax(1)
    return -(q * log_hat).sum(1).mean() / n_old


class MiB(Strategy):
    """Unbiased cross-entropy + unbiased distillation + background initialisation of new classes.

    Args:
        distill_weight: weight of the unbiased distillation (paper: 10 on VOC, 100 on ADE).
            20 here: at the CamVid recipe it kept 0.952x joint's mIoU on camvid-6-1 over four
            seeds against 10's 0.949x (ahead in three), and 0.952x on camvid-6-5 over two as 10
            did (benchmarks/README.md).
    """

    name = "mib"
    reuses_backbone = True
    head_init = "background"

    def __init__(self, distill_weight: float = 20.0):
        super().__init__()
        self.distill_weight = distill_weight

    def _unbiased(self) -> bool:
        # Without a background shift label 0 is a class like any other (a domain step's Sky):
        # merging the old classes into it would make its pixels cost nothing.
        return self.old_model is not None and self.ctx.background_shift

    def on_fit_start(self, trainer) -> None:
        if self._unbiased():
            log.info("mib: label 0 of the %s loss stands for background or an old class (unbiased)",
                     trainer.config.loss.kind)

    def shape_loss(self, trainer, batch: Batch, output: StepOutput, shape) -> None:
        if self._unbiased():
            shape.merge_background(self.ctx.old_num_classes, self.name)

    def loss_terms(self, trainer, batch: Batch, output: StepOutput) -> dict[str, torch.Tensor]:
        if self.old_model is None:
            return {}
        old = self.old_outputs(batch.image, trainer=trainer, output=output)
        return {"mib_distill": self.distill_weight * unbiased_distillation(output.logits, old)}


__all__ = ["MiB", "unbiased_distillation"]

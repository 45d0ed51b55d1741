"""MiB: Modeling the Background (Cermelli et al., CVPR 2020).

In step t the background label covers old classes too (the background shift). MiB
therefore (1) scores a background pixel by the probability of "background or any old
class" (unbiased cross-entropy; here the recipe's own loss shaped by
:class:`~everseg.learn.losses.LossShape`, so its Dice term, class weights and label
smoothing are kept and made unbiased too), (2) distils the old model into "background or any new
class" for its background (unbiased distillation), and (3) starts new classifier rows
as copies of the background row (``Segmenter.grow_classifier(init="background")``).

Optional, not in the paper (``feature_weight``, off by default): the backbone's deepest map and
the decoder's output, on the pixels labelled background (in a step of new classes, the old
classes' pixels too), are held near the old model's by a mean squared distance. With a frozen
backbone the decoder is what moves: after one 6-minute camvid-6-1 step its features differ from
the old model's by a mean square of 0.15 (0.62 the features' own), and the classes taught in
earlier short steps lose a point or so of IoU at every later step while the base classes barely
move. Pixels of the class being taught are left free.
"""

from __future__ import annotations

import logging

import torch

import torch.nn.functional as F

from everseg.learn.plugins import Batch, StepOutput
from everseg.learn.strategies.base import Strategy
from everseg.learn.strategies.plop import statistics_as

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


def background_feature_distillation(new_features: torch.Tensor, old_features: torch.Tensor,
                                    target: torch.Tensor) -> torch.Tensor:
    """Mean over the pixels labelled 0 of the channel-mean squared difference between two
    feature maps (N x C x h x w, the labels N x H x W taken at the maps' size, nearest)."""
    keep = F.interpolate((target == 0).unsqueeze(1).float(), size=new_features.shape[-2:], mode="nearest")[:, 0]
    sq = (new_features.float() - old_features.float()).pow(2).mean(1)
    return (sq * keep).sum() / keep.sum().clamp_min(1.0)


class MiB(Strategy):
    """Unbiased cross-entropy + unbiased distillation + background initialisation of new classes.

    Args:
        distill_weight: weight of the unbiased distillation (paper: 10 on VOC, 100 on ADE).
        feature_weight: weight of the feature distillation (deepest backbone map and decoder
            output) on background pixels in a step of new classes (0 = off, as published). The old decoder runs on the batch's
            BatchNorm statistics for it, as the trained one does (PLOP's ``batch_statistics``):
            with its running ones, unchanged weights would already differ by a tenth of the drift
            a step causes.
    """

    name = "mib"
    reuses_backbone = True
    head_init = "background"

    def __init__(self, distill_weight: float = 10.0, feature_weight: float = 0.0):
        super().__init__()
        if feature_weight < 0:
            raise ValueError(f"mib.feature_weight must be >= 0, not {feature_weight}")
        self.distill_weight, self.feature_weight = distill_weight, feature_weight

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
        terms = {"mib_distill": self.distill_weight * unbiased_distillation(output.logits, old)}
        if self.feature_weight and self._unbiased():
            with statistics_as(self.old_model, trainer.model):
                _, old_features = self.old_outputs(batch.image, features=True, trainer=trainer, output=output)
            # The deepest backbone map and the decoder's output: where the old classes' features
            # drift (a frozen backbone shared with the old model gives both models the same map).
            new_maps = (output.features["backbone"][-1], output.features["decoder"])
            old_maps = (old_features["backbone"][-1], old_features["decoder"])
            terms["mib_features"] = self.feature_weight * sum(
                background_feature_distillation(n, o, batch.mask) for n, o in zip(new_maps, old_maps))
        return terms


__all__ = ["MiB", "background_feature_distillation", "unbiased_distillation"]

"""MiB: Modeling the Background (Cermelli et al., CVPR 2020).

In step t the background label covers old classes too (the background shift). MiB
therefore (1) scores a background pixel by the probability of "background or any old
class" (unbiased cross-entropy), (2) distils the old model into "background or any new
class" for its background (unbiased distillation), and (3) starts new classifier rows
as copies of the background row (``Segmenter.grow_classifier(init="background")``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from everseg.learn.plugins import Batch, StepOutput
from everseg.learn.strategies.base import Strategy

log = logging.getLogger(__name__)


class UnbiasedCrossEntropy(nn.Module):
    """CE where label 0 means "background or an old class": ``-log sum_{c in {0} + old} p_c``.

    Pixels of new classes use their own probability as usual; ``old_classes`` counts the
    classes (background included) the previous model knew. ``class_weights`` weight each
    pixel by its label and average like ``F.cross_entropy`` does (sum of weighted losses /
    sum of weights): the step's recipe weights rare new classes up, and MiB must not undo it.
    """

    def __init__(self, old_classes: int, ignore_index: int = 255, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.old_classes = old_classes
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        denom = torch.logsumexp(logits, dim=1)
        log_p = logits - denom.unsqueeze(1)
        log_bg = torch.logsumexp(logits[:, : self.old_classes], dim=1) - denom  # background + old
        valid = target != self.ignore_index
        safe = torch.where(valid, target, 0)
        picked = log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
        per_pixel = torch.where(safe == 0, log_bg, picked)
        weight = valid.float()
        if self.class_weights is not None:
            weight = weight * self.class_weights.to(logits.device)[safe]
        return -(per_pixel * weight).sum() / weight.sum().clamp_min(1e-12)


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
    """

    name = "mib"
    head_init = "background"
    changes_seg_loss = "replaces the cross-entropy with MiB's unbiased cross-entropy"

    def __init__(self, distill_weight: float = 10.0):
        super().__init__()
        self.distill_weight = distill_weight

    def on_fit_start(self, trainer) -> None:
        # Without a background shift label 0 is a class like any other (a domain step's Sky):
        # merging the old classes into it would make its pixels cost nothing.
        if self.old_model is not None and self.ctx.background_shift:
            kind = trainer.config.loss.kind
            # Dice on this step's label 0, which hides the old classes, would teach them away: MiB's
            # loss is its unbiased cross-entropy alone, as published.
            dropped = f"; the recipe's {kind} loss is not used (its Dice term included)" if "dice" in kind else ""
            log.info("mib: the segmentation loss is MiB's unbiased cross-entropy (background = background "
                     "or an old class)%s", dropped)
            trainer.criterion = UnbiasedCrossEntropy(self.ctx.old_num_classes,
                                                     trainer.train_set.label_space.ignore_index,
                                                     getattr(trainer.criterion, "class_weights", None))

    def loss_terms(self, trainer, batch: Batch, output: StepOutput) -> dict[str, torch.Tensor]:
        if self.old_model is None:
            return {}
        old = self.old_outputs(batch.image)
        return {"mib_distill": self.distill_weight * unbiased_distillation(output.logits, old)}


__all__ = ["MiB", "UnbiasedCrossEntropy", "unbiased_distillation"]

"""MiB: Modeling the Background (Cermelli et al., CVPR 2020).

In step t the background label covers old classes too (the background shift). MiB
therefore (1) scores a background pixel by the probability of "background or any old
class" (unbiased cross-entropy; here the recipe's own loss shaped by
:class:`~everseg.learn.losses.LossShape`, so its Dice term, class weights and label
smoothing are kept and made unbiased too), (2) distils the old model into "background or any new
class" for its background (unbiased distillation), and (3) starts new classifier rows
as copies of the background row (``Segmenter.grow_classifier(init="background")``).

Optional, not in the paper (``calibrate_images``, off by default): after each step of new
classes, the old classes' biases are re-balanced so that, on the step's background pixels, the
new model spreads the old classes' share of probability among them as the old model does
(Saerens et al.'s prior adjustment, 2002, with the old model's outputs as the target priors).
On camvid-6-1 the classes taught in earlier steps lose recall at every later step at an
unchanged precision (Pole: predicted on 138k test pixels after its own step, 88k four steps
later, 43-47 % of them right throughout): their logits sink against the base classes'.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from everseg.learn.plugins import Batch, StepOutput
from everseg.learn.strategies.base import Strategy

log = logging.getLogger(__name__)


def unbiased_distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, class_balanced: bool = False
                          ) -> torch.Tensor:
    """``-1/|old| sum_c q_c log p^_c``, averaged over pixels, where the new model's background
    probability is that of "background or any new class" (log-sum-exp over those logits).

    ``class_balanced``: averaged over the pixels of each class the old model predicts, then over
    those classes, so that a class on 1 % of the pixels weighs as much as the road."""
    n_old = old_logits.shape[1]
    new_logits = new_logits.float()
    denom = torch.logsumexp(new_logits, dim=1, keepdim=True)
    bg_or_new = torch.cat([new_logits[:, :1], new_logits[:, n_old:]], dim=1)
    log_bg = torch.logsumexp(bg_or_new, dim=1, keepdim=True) - denom
    log_old = new_logits[:, 1:n_old] - denom
    log_hat = torch.cat([log_bg, log_old], dim=1)
    q = old_logits.float().softmax(1)
    per_pixel = -(q * log_hat).sum(1) / n_old
    if not class_balanced:
        return per_pixel.mean()
    predicted = q.argmax(1).flatten()
    sums = per_pixel.new_zeros(n_old).scatter_add(0, predicted, per_pixel.flatten())
    counts = torch.bincount(predicted, minlength=n_old)
    present = counts > 0
    return (sums[present] / counts[present]).mean()


def prior_offsets(new_logits: torch.Tensor, old_probs: torch.Tensor, iterations: int = 200,
                  limit: float = 2.0) -> torch.Tensor:
    """Offsets for the first K = ``old_probs.shape[0]`` logits (classes x pixels) such that the
    softmax's mean probability of each of those classes is in the proportions of ``old_probs``'
    means, their total left as it is (the other classes keep theirs): Saerens et al.'s fixed
    point, ``b += log(target / current)``. Classes with no probability to match keep 0; offsets
    are clipped to +-``limit``."""
    k = old_probs.shape[0]
    prior = old_probs.float().mean(1)
    offsets = new_logits.new_zeros(new_logits.shape[0], dtype=torch.float32)
    matched = prior > 1e-4
    for _ in range(iterations):
        current = (new_logits.float() + offsets[:, None]).softmax(0).mean(1)[:k]
        target = prior / prior.sum() * current.sum()
        update = torch.where(matched, (target.clamp_min(1e-12) / current.clamp_min(1e-12)).log(),
                             torch.zeros_like(target))
        offsets[:k] = (offsets[:k] + update).clamp(-limit, limit)
        if update.abs().max() < 1e-4:
            break
    return offsets[:k]


@torch.no_grad()
def calibrate_old_classes(trainer, old_model, old_classes: int, images: int, stride: int = 4) -> list[float]:
    """Shift the trained model's old-class biases by :func:`prior_offsets` measured on the
    pixels labelled 0 of up to ``images`` of the step's training images (every ``stride``-th
    pixel each way, no augmentation), with the old model's probabilities as the target."""
    model = trainer.model
    modes = {m: m.training for m in model.modules()}
    model.eval()
    data = trainer.train_set.with_transform(None)
    picks = np.unique(np.linspace(0, len(data) - 1, min(len(data), images)).round()).astype(int)
    new_logits, old_probs = [], []
    try:
        for i in picks.tolist():
            item = data[i]
            x = item["image"][None].to(trainer.device).float() / 255.0
            with trainer.autocast():
                new, old = model(x), old_model(x)
            keep = (item["mask"] == 0)[::stride, ::stride].to(new.device)
            new_logits.append(new[0, :, ::stride, ::stride][:, keep].float().cpu())
            old_probs.append(old[0, :, ::stride, ::stride][:, keep].float().softmax(0).cpu())
    finally:
        for m, training in modes.items():
            m.train(training)
    if not new_logits or sum(t.shape[1] for t in new_logits) == 0:
        return [0.0] * old_classes
    offsets = prior_offsets(torch.cat(new_logits, 1), torch.cat(old_probs, 1))
    model.classifier.bias[:old_classes] += offsets.to(model.classifier.bias.device, model.classifier.bias.dtype)
    return offsets.tolist()


class MiB(Strategy):
    """Unbiased cross-entropy + unbiased distillation + background initialisation of new classes.

    Args:
        distill_weight: weight of the unbiased distillation (paper: 10 on VOC, 100 on ADE).
        class_balanced: average the distillation over each class the old model predicts, then
            over the classes (off = over pixels, as published): pixel means leave the small
            classes taught in earlier steps little to keep them.
        calibrate_images: after a step of new classes, re-balance the old classes' biases on
            the background pixels of this many of the step's images, evenly spread (0 = off,
            as published; the pass counts against the step's time budget).
    """

    name = "mib"
    reuses_backbone = True
    head_init = "background"

    def __init__(self, distill_weight: float = 10.0, class_balanced: bool = False, calibrate_images: int = 0):
        super().__init__()
        if calibrate_images < 0:
            raise ValueError(f"mib.calibrate_images must be >= 0, not {calibrate_images}")
        self.distill_weight, self.class_balanced = distill_weight, class_balanced
        self.calibrate_images = calibrate_images
        self.bias_offsets: list[float] = []  # the last calibration's, for the log and tests

    def _unbiased(self) -> bool:
        # Without a background shift label 0 is a class like any other (a domain step's Sky):
        # merging the old classes into it would make its pixels cost nothing.
        return self.old_model is not None and self.ctx.background_shift

    def on_fit_start(self, trainer) -> None:
        if self._unbiased():
            log.info("mib: label 0 of the %s loss stands for background or an old class (unbiased)",
                     trainer.config.loss.kind)

    def wrap_up_images(self, trainer) -> int:
        return min(self.calibrate_images, len(trainer.train_set)) if self._unbiased() else 0

    def end_step(self, ctx, trainer) -> None:
        if self.calibrate_images and self._unbiased():
            self.bias_offsets = calibrate_old_classes(trainer, self.old_model, ctx.old_num_classes,
                                                      self.calibrate_images)
            log.info("mib: old classes' bias offsets %s", [round(b, 3) for b in self.bias_offsets])

    def shape_loss(self, trainer, batch: Batch, output: StepOutput, shape) -> None:
        if self._unbiased():
            shape.merge_background(self.ctx.old_num_classes, self.name)

    def loss_terms(self, trainer, batch: Batch, output: StepOutput) -> dict[str, torch.Tensor]:
        if self.old_model is None:
            return {}
        old = self.old_outputs(batch.image, trainer=trainer, output=output)
        return {"mib_distill": self.distill_weight * unbiased_distillation(output.logits, old, self.class_balanced)}


__all__ = ["MiB", "calibrate_old_classes", "prior_offsets", "unbiased_distillation"]

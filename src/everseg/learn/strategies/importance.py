"""Parameter-importance regularisers, EWC and MAS, and per-sample importance weighting of the loss.

EWC and MAS estimate after each step how much every parameter mattered, and then
penalise moving important parameters: ``sum_i Omega_i (theta_i - theta*_i)^2``, with
``theta*`` the weights at the end of the previous step. Importance accumulates over
steps (a running sum, as in online EWC, Schwarz et al. 2018). Classifier rows of classes
added later have no previous value and are not penalised.

A step that starts from a model trained elsewhere (a shared base, or ``everseg learn`` on
a bare model) has no importance yet: it is then estimated from the previous model on the
step's own images before training, with the previous model's predictions as labels where
labels are needed (EWC). Without that the first step would have no penalty at all.
The importance is saved beside every model a step writes, so a run that continues from
that model (``--resume``, or ``learn`` again) goes on accumulating it instead of measuring
it anew; the anchor is that model's own weights.

The quadratic penalty is a spring of stiffness ``2 * weight * Omega`` per parameter; under
SGD with learning rate ``lr`` it overshoots its anchor, and diverges, once ``lr`` times the
stiffness passes 2. Importance is therefore capped so that ``lr * 2 * weight * Omega <= 1``
(MAS's unnormalised output-norm gradients reach that on real images: the loss went to inf
on camvid-domains).
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from everseg.atomic import atomic_torch_save
from everseg.learn.plugins import Batch, StepOutput
from everseg.learn.strategies.base import RunStart, Strategy

log = logging.getLogger(__name__)


class _ParameterImportance(Strategy, ABC):
    """Shared machinery: store importance + anchor weights, add the quadratic penalty."""

    def __init__(self, weight: float, max_batches: int, batch_size: int):
        super().__init__()
        self.weight, self.max_batches, self.batch_size = weight, max_batches, batch_size
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def _batches(self, trainer) -> Iterator[torch.Tensor | dict]:
        data = trainer.train_set  # augmented like training, which is what the weights were fitted on
        loader = DataLoader(data, batch_size=self.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        for i, raw in enumerate(loader):
            if i >= self.max_batches:
                break
            yield trainer.to_batch(raw)

    @abstractmethod
    def sample_importance(self, model: nn.Module, batch: Batch, own_labels: bool = False) -> None:
        """Backpropagate the quantity whose gradient magnitude measures importance.

        ``own_labels``: the batch's labels are not the model's task (a new step's images);
        strategies that need labels use the model's own predictions instead.
        """

    def _estimate(self, model: nn.Module, trainer, own_labels: bool) -> dict[str, torch.Tensor]:
        was_training = model.training
        model.eval()
        sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        samples = 0
        for batch in self._batches(trainer):
            # Per image, as both papers define it: the square (EWC) or magnitude (MAS) of a
            # batch's mean gradient is smaller than the mean over its images, and by a factor
            # that depends on the batch size and on how much the images agree.
            for i in range(batch.image.shape[0]):
                one = Batch(batch.image[i:i + 1], batch.mask[i:i + 1], batch.stems[i:i + 1])
                model.zero_grad(set_to_none=True)
                self.sample_importance(model, one, own_labels)
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        sums[n] += self.grad_to_importance(p.grad.detach())
                samples += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return {n: s / max(1, samples) for n, s in sums.items()}

    def _stored(self, model_dir: Path) -> Path:
        return model_dir / f"{self.name}-importance.pt"

    def begin_run(self, run: RunStart) -> None:
        stored = None if run.base_model is None else self._stored(run.base_model)
        if not self.importance and stored is not None and stored.is_file():
            try:
                self.importance = torch.load(stored, map_location="cpu", weights_only=True)
            except Exception:  # torch's unpickling errors run over lines and suggest an unsafe load
                raise ValueError(f"{stored}: not a readable {self.name} importance file (damaged, or not "
                                 "written by everseg); delete it to measure the importance anew") from None
            log.info("%s: importance accumulated so far loaded from %s", self.name, stored)

    def save(self, model_dir: Path) -> None:
        if self.importance:
            # The anchor is not stored: it is the saved model's own weights.
            atomic_torch_save(self._stored(model_dir), {n: w.detach().cpu() for n, w in self.importance.items()})

    def on_fit_start(self, trainer) -> None:
        if not self.anchor and self.old_model is not None:
            if not self.importance:
                # The previous model was trained elsewhere: measure what mattered to it now.
                old = copy.deepcopy(self.old_model)
                for p in old.parameters():
                    p.requires_grad_(True)
                self.importance = self._estimate(old, trainer, own_labels=True)
            # (Else the importance was stored with the model the run continues from.)
            self.anchor = {n: p.detach().clone() for n, p in self.old_model.named_parameters()}
        if self.anchor:
            # Measured or resumed on another device than this run's (checkpoints load on the CPU).
            self.anchor = {n: a.to(trainer.device) for n, a in self.anchor.items()}
            self.importance = {n: w.to(trainer.device) for n, w in self.importance.items()}
            lr = max(g.get("initial_lr", g["lr"]) for g in trainer.optimizer.param_groups)
            if lr > 0 and self.weight > 0:
                # The penalty's curvature is 2 x weight x importance; once that times the LR passes 1,
                # SGD overshoots the anchor further each step and training diverges. Capping the
                # importance there keeps every weight's step stable; only the most important weights
                # reach the cap, which the papers' smaller lr x weight products never hit.
                cap = 1.0 / (2.0 * self.weight * lr)
                self.importance = {n: w.clamp(max=cap) for n, w in self.importance.items()}

    def wrap_up_images(self, trainer) -> int:
        return min(self.max_batches * self.batch_size, len(trainer.train_set))  # end_step's pass

    def end_step(self, ctx, trainer) -> None:
        for n, s in self._estimate(trainer.model, trainer, own_labels=False).items():
            prev = self.importance.get(n)
            if prev is not None and prev.shape == s.shape:
                s = s + prev
            self.importance[n] = s
        self.anchor = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    @staticmethod
    def grad_to_importance(grad: torch.Tensor) -> torch.Tensor:
        return grad.pow(2)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        total = None
        for n, p in model.named_parameters():
            if n not in self.anchor:
                continue
            a, w = self.anchor[n], self.importance[n]
            rows = min(a.shape[0], p.shape[0]) if a.dim() else None
            if a.shape != p.shape:  # a grown classifier: only the old rows have an anchor
                if a.shape[1:] != p.shape[1:]:
                    continue
                term = (w * (p[:rows] - a).pow(2)).sum()
            else:
                term = (w * (p - a).pow(2)).sum()
            total = term if total is None else total + term
        return total if total is not None else torch.zeros((), device=next(model.parameters()).device)

    def loss_terms(self, trainer, batch: Batch, output: StepOutput) -> dict[str, torch.Tensor]:
        if not self.anchor:
            return {}
        return {self.name: self.weight * self.penalty(trainer.model)}

    def state_dict(self):
        return {"importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state) -> None:
        self.importance, self.anchor = state.get("importance", {}), state.get("anchor", {})


class EWC(_ParameterImportance):
    """Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017).

    Importance = diagonal empirical Fisher information: the mean squared gradient of the
    per-pixel log-likelihood of the labels. Penalty ``weight/2 * sum F (theta - theta*)^2``.

    Args:
        weight: lambda (segmentation papers use 100 ... 5000; 500 here).
        max_batches: batches of ``batch_size`` images whose per-image Fisher information is averaged.
    """

    name = "ewc"

    def __init__(self, weight: float = 500.0, max_batches: int = 16, batch_size: int = 4):
        super().__init__(weight / 2, max_batches, batch_size)

    def sample_importance(self, model, batch: Batch, own_labels: bool = False) -> None:
        logits = model(batch.image)
        target = logits.detach().argmax(1) if own_labels else batch.mask
        F.cross_entropy(logits.float(), target, ignore_index=255).backward()


class MAS(_ParameterImportance):
    """Memory Aware Synapses (Aljundi et al., ECCV 2018).

    Importance = mean absolute gradient of the squared L2 norm of the model's output,
    which needs no labels. Penalty ``weight * sum Omega (theta - theta*)^2``.

    Args:
        weight: lambda (paper: 1; segmentation uses larger, 10 here).
        max_batches: batches of ``batch_size`` images whose per-image importance is averaged.
    """

    name = "mas"

    def __init__(self, weight: float = 10.0, max_batches: int = 16, batch_size: int = 4):
        super().__init__(weight, max_batches, batch_size)

    def sample_importance(self, model, batch: Batch, own_labels: bool = False) -> None:
        logits = model(batch.image).float()  # no labels needed
        logits.pow(2).sum(1).mean().backward()

    @staticmethod
    def grad_to_importance(grad: torch.Tensor) -> torch.Tensor:
        return grad.abs()


def per_sample_weights(losses: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(l_i / mean l)^gamma``, renormalised to mean 1: samples the old model gets wrong weigh more."""
    w = (losses.clamp_min(1e-8) / losses.clamp_min(1e-8).mean()).pow(gamma)
    return w / w.mean()


class SampleWeighting(Strategy):
    """Per-sample importance weighting of the segmentation loss.

    Each image's cross-entropy is weighted by how badly the previous model does on it
    (its own cross-entropy on the image's labels of classes it knows), raised to
    ``gamma`` and normalised to mean 1: images that bring something new count more,
    images the model already handles count less - importance weighting in the sense of
    Shimodaira (2000), with the old model's loss as the importance. The weights shape the
    recipe's loss (:class:`~everseg.learn.losses.LossShape`): its class weights and Dice term
    stay, and other strategies' changes apply too. At step 0 (no old model) it does nothing.

    Args:
        gamma: sharpness of the weighting (0 = every image weighs the same).
    """

    name = "weighting"
    reuses_backbone = True

    def __init__(self, gamma: float = 1.0):
        super().__init__()
        self.gamma = gamma

    def on_fit_start(self, trainer) -> None:
        if self.old_model is not None:
            log.info("weighting: each image's cross-entropy is weighted by the previous model's loss on it")

    def shape_loss(self, trainer, batch: Batch, output: StepOutput, shape) -> None:
        if self.old_model is None:
            return
        ignore = trainer.train_set.label_space.ignore_index
        target = batch.mask
        valid = (target != ignore).flatten(1).sum(1).clamp_min(1)  # the old model's loss: unweighted
        with torch.no_grad():
            old_logits = self.old_outputs(batch.image, trainer=trainer, output=output)
            known = torch.where(target < old_logits.shape[1], target, torch.full_like(target, ignore))
            old_loss = F.cross_entropy(old_logits.float(), known, ignore_index=ignore, reduction="none")
            shape.weight_images(per_sample_weights(old_loss.flatten(1).sum(1) / valid, self.gamma), self.name)

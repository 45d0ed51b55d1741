"""The hooks through which methods extend the one training loop.

A plugin overrides only the hooks it needs. Hooks run in the order the plugins
were given. Incremental-learning strategies, fine-tuning schedules and anything
else that changes training are plugins, so the loop in ``trainer.py`` stays the
single place where training happens.

What a plugin may read and change on the Trainer (the contract the loop keeps; anything
else on the Trainer is its own and may change without notice):

Read: ``config`` (the RunConfig; never modify it), ``model`` (the model being trained,
unwrapped), ``train_set`` (its ``label_space``, ``transform``, ``with_transform``, counts),
``device``, ``autocast()`` (the run's mixed-precision context, for models a plugin runs),
``to_batch(raw)`` (a loader batch as the model takes it), ``epoch``, ``global_step``,
``optimizer`` (from ``on_fit_start`` on: its learning rates) and ``criterion`` (the
recipe's :class:`~everseg.learn.losses.SegmentationLoss`).

Change, only through these: the batch, in ``before_forward`` (images and masks: replay,
pseudo-labels; ``batch.extra`` for the plugin's own data); the masks, also in
``after_forward`` (pseudo-labels from a model that reuses the forward pass's features); the
segmentation loss, in ``shape_loss`` through :class:`~everseg.learn.losses.LossShape` (never by replacing
``criterion``); extra loss terms, returned by ``loss_terms``; gradients, in
``after_backward``; the model's weights, in ``after_step`` or ``end_step`` (Reptile, weight
fusion) and which of them train, in ``on_fit_start`` (a frozen backbone);
``criterion.class_weights``, in ``on_fit_start`` (replay counting its memory); stopping,
with ``request_stop()``; more optimiser steps, only through ``nested_step(batch)`` (from
``before_forward`` or ``after_step``: MER's per-image steps). Models a plugin runs beside the
trained one are returned by ``frozen_models`` so the Trainer moves them to its device; work
a plugin does after training counts in the time budget when ``wrap_up_images`` announces it.
With ``train.ema_decay`` the Trainer keeps a weight average, updated after ``after_step`` (so
weights a plugin sets there enter it): ``model`` holds the average during ``on_validation`` and
from ``on_fit_end`` on, the trained weights everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from everseg.learn.losses import LossShape
    from everseg.learn.trainer import Trainer


@dataclass
class Batch:
    """What one training step works on; plugins may replace ``image``/``mask`` (e.g. replay)."""

    image: torch.Tensor  # float N x 3 x H x W in [0, 1]
    mask: torch.Tensor  # int64 N x H x W, 255 = ignore
    stems: list[str]
    extra: dict[str, Any] = field(default_factory=dict)  # free space for plugins


@dataclass
class StepOutput:
    logits: torch.Tensor  # N x C x H x W
    features: dict[str, Any] | None  # model features when a plugin asked for them


class Plugin:
    """Base class with every hook as a no-op."""

    needs_features: bool = False  # ask the model for intermediate features each step

    def frozen_models(self) -> list[torch.nn.Module]:
        """Models the plugin runs beside the trained one (a teacher, the previous step's model);
        the Trainer moves them to its device before ``on_fit_start``."""
        return []

    def on_fit_start(self, trainer: "Trainer") -> None:
        """After the model, optimiser and data are ready, before the first epoch."""

    def wrap_up_images(self, trainer: "Trainer") -> int:
        """Images the plugin will pass through the model after training (EWC's importance
        pass): the Trainer keeps time for them inside its budget. Asked after ``on_fit_start``."""
        return 0

    def on_epoch_start(self, trainer: "Trainer") -> None:
        """Before each epoch; ``trainer.epoch`` is the 0-based epoch about to run."""

    def before_forward(self, trainer: "Trainer", batch: Batch) -> None:
        """May edit ``batch`` in place (add replayed samples, relabel, ...)."""

    def after_forward(self, trainer: "Trainer", batch: Batch, output: StepOutput) -> None:
        """After the forward pass, before any loss: may relabel ``batch.mask`` (the images have
        been through the model and stay as they are). For pseudo-labels that need the pass's
        features, e.g. from a previous model that reuses the frozen backbone's."""

    def shape_loss(self, trainer: "Trainer", batch: Batch, output: StepOutput, shape: "LossShape") -> None:
        """Change how the recipe's segmentation loss treats this batch, through ``shape``
        (:class:`~everseg.learn.losses.LossShape`: image weights, what label 0 stands for).
        The one way to change that loss: every plugin's changes compose."""

    def loss_terms(self, trainer: "Trainer", batch: Batch, output: StepOutput) -> dict[str, torch.Tensor]:
        """Extra loss terms, added to the segmentation loss (``"seg"``, which they may not replace)
        and logged under their names."""
        return {}

    def after_backward(self, trainer: "Trainer") -> None:
        """Gradients are ready; the optimiser has not stepped yet."""

    def after_step(self, trainer: "Trainer", batch: Batch, output: StepOutput) -> None:
        """After the optimiser step (or after an accumulation micro-step)."""

    def on_validation(self, trainer: "Trainer", metrics: Any) -> None:
        """After each validation, with its SegmentationMetrics."""

    def on_epoch_end(self, trainer: "Trainer") -> None:
        """After each epoch, its validation and checkpoint."""

    def on_fit_end(self, trainer: "Trainer") -> None:
        """After training has finished or stopped early."""

    def state_dict(self) -> dict[str, Any]:
        """What the plugin needs to continue after ``--resume``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

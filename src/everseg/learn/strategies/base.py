"""What an incremental-learning strategy is: a training-loop plugin that also lives across steps.

The continual runner (:mod:`everseg.learn.continual`) keeps one instance of each strategy
for a whole scenario and fires, in this order:

- :meth:`Strategy.begin_run` once, with the base model's folder when step 0 was learned
  elsewhere (replay loads the memory stored with it);
- per step, :meth:`Strategy.begin_step` with the :class:`ContinualContext` (the step, the
  frozen model of the previous step); then the ordinary Trainer hooks while it trains; then
  :meth:`Strategy.end_step`, to keep what the next step needs (importance weights, the
  memory's new images). A step the base model learned elsewhere is not trained:
  :meth:`Strategy.learned_elsewhere` is fired for it instead;
- :meth:`Strategy.save` with every model folder the runner writes, to store beside the model
  what a later run from it needs (replay's memory).

What the runner decides from a strategy is in its class attributes: ``head_init`` (how new
classifier rows start) and ``retrains`` (joint: every step starts again from the pretrained
backbone on all the data so far, with step 0's budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from everseg.learn.plugins import Plugin

if TYPE_CHECKING:
    from everseg.data.scenarios import Step
    from everseg.learn.plugins import StepOutput
    from everseg.learn.trainer import Trainer


@dataclass
class ContinualContext:
    """What the runner tells strategies about the step at hand."""

    step: "Step"
    step_index: int
    old_model: nn.Module | None  # the previous step's model, frozen, eval mode (None at step 0)
    old_num_classes: int  # classes the old model predicts (0 at step 0)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def background_shift(self) -> bool:
        """Whether label 0 of this step's data also covers classes it does not label: a step
        that teaches new classes in a label space with a background class. Domain steps and
        label spaces without background (a domain scenario's class 0 is e.g. Sky) have none."""
        from everseg.data.scenarios import has_background

        step = self.step
        return step is not None and bool(step.new_classes) and has_background(step.label_space)


@dataclass
class RunStart:
    """What the runner tells strategies once, before the first step."""

    base_model: Path | None  # the model folder that learned step 0 elsewhere, if any
    seed: int


class Strategy(Plugin):
    """A plugin with more hooks: once per run, around each step, and when a model is saved."""

    name = "strategy"
    head_init = "random"  # how new classifier rows start: "random" or "background" (MiB)
    retrains = False  # every step from the pretrained backbone on all data so far (joint)
    # Whether it keeps a ReplayMemory in ``self.memory``; a caller may set one before the run
    # (``learn`` fills it from the data a model learned from), else begin_run makes it.
    uses_memory = False
    # Whether its old_outputs may reuse the trained model's backbone features (it then asks for them).
    reuses_backbone = False

    def __init__(self) -> None:
        self.ctx: ContinualContext | None = None
        self._shared_backbone: tuple[Any, bool] | None = None

    @property
    def needs_features(self) -> bool:
        return self.reuses_backbone and self.old_model is not None

    def begin_run(self, run: RunStart) -> None:
        """Before the first step."""

    def begin_step(self, ctx: ContinualContext) -> None:
        self.ctx = ctx

    def end_step(self, ctx: ContinualContext, trainer: "Trainer") -> None:
        """After the step's training, before its evaluation; its time counts in the step's cost."""

    def learned_elsewhere(self, ctx: ContinualContext) -> None:
        """For a step the runner did not train because the base model had learned it."""

    def save(self, model_dir: Path) -> None:
        """Store beside the model in ``model_dir`` what a run continuing from it needs."""

    @property
    def old_model(self) -> nn.Module | None:
        return None if self.ctx is None else self.ctx.old_model

    def frozen_models(self) -> list[nn.Module]:
        return [] if self.old_model is None else [self.old_model]

    @torch.no_grad()
    def old_outputs(self, image: torch.Tensor, features: bool = False, *, trainer: "Trainer | None" = None,
                    output: "StepOutput | None" = None) -> Any:
        """The previous model's logits (and features) on ``image``, without gradients.

        Given the ``trainer`` and the step's ``output`` with backbone features: when the trained
        model's backbone is frozen at the previous model's weights (later steps' default), the
        previous model runs only its decoder on those features; the backbone pass it would
        repeat is a large share of a step's time.
        """
        model = self.old_model
        if model is None:
            raise RuntimeError(f"{self.name}: no previous model at step 0")
        if output is not None and output.features is not None and self._shares_backbone(trainer):
            return model.head(output.features["backbone"], tuple(image.shape[-2:]), return_features=features)
        return model(image, return_features=features)

    def _shares_backbone(self, trainer: "Trainer | None") -> bool:
        if trainer is None:
            return False
        key = (id(self.ctx), id(trainer.model))
        if self._shared_backbone is None or self._shared_backbone[0] != key:
            # Checked once a step: a frozen backbone's weights do not move within it.
            new, old = trainer.model, self.old_model
            shared = hasattr(new, "same_backbone") and hasattr(old, "head") and new.same_backbone(old)
            self._shared_backbone = (key, shared)
        return self._shared_backbone[1]

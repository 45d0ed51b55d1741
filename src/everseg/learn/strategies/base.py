"""What an incremental-learning strategy is: a training-loop plugin that also lives across steps.

The continual runner (:mod:`everseg.learn.continual`) keeps one instance of each strategy
for a whole scenario. Before each step it calls :meth:`Strategy.begin_step` with the
:class:`ContinualContext` (the step, the frozen model of the previous step, the replay
memory); the strategy then acts through the ordinary Trainer hooks; after training,
:meth:`Strategy.end_step` lets it store what the next step needs (importance weights,
memory samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from everseg.learn.plugins import Plugin

if TYPE_CHECKING:
    from everseg.data.scenarios import Step
    from everseg.learn.memory import ReplayMemory
    from everseg.learn.trainer import Trainer


@dataclass
class ContinualContext:
    """What the runner tells strategies about the step at hand."""

    step: "Step"
    step_index: int
    old_model: nn.Module | None  # the previous step's model, frozen, eval mode (None at step 0)
    old_num_classes: int  # classes the old model predicts (0 at step 0)
    memory: "ReplayMemory | None" = None  # shared replay memory, when a strategy uses one
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def background_shift(self) -> bool:
        """Whether label 0 of this step's data also covers classes it does not label: a step
        that teaches new classes in a label space with a background class. Domain steps and
        label spaces without background (a domain scenario's class 0 is e.g. Sky) have none."""
        from everseg.data.scenarios import has_background

        step = self.step
        return step is not None and bool(step.new_classes) and has_background(step.label_space)


class Strategy(Plugin):
    """A plugin with two more hooks, around each incremental step."""

    name = "strategy"
    head_init = "random"  # how new classifier rows start: "random" or "background" (MiB)
    uses_memory = False  # the runner creates a ReplayMemory when any strategy sets this

    def __init__(self) -> None:
        self.ctx: ContinualContext | None = None

    def begin_step(self, ctx: ContinualContext) -> None:
        self.ctx = ctx

    def end_step(self, ctx: ContinualContext, trainer: "Trainer") -> None:
        """After the step's training, before its evaluation."""

    @property
    def old_model(self) -> nn.Module | None:
        return None if self.ctx is None else self.ctx.old_model

    def frozen_models(self) -> list[nn.Module]:
        return [] if self.old_model is None else [self.old_model]

    @torch.no_grad()
    def old_outputs(self, image: torch.Tensor, features: bool = False) -> Any:
        """The previous model's logits (and features) on ``image``, without gradients."""
        model = self.old_model
        if model is None:
            raise RuntimeError(f"{self.name}: no previous model at step 0")
        return model(image, return_features=features)

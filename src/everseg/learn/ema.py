"""An exponential moving average of a model's weights, kept beside the trained ones.

The averaged weights are the ones validated, saved and handed back at the end of a fit
(``train.ema_decay``); the trained ones keep taking the optimiser's steps. Buffers are averaged
too (BatchNorm's running statistics), so the averaged model is evaluated with statistics that
drifted with its own weights rather than with the last step's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class WeightAverage:
    """Tracks ``decay``-weighted averages of every floating-point tensor of ``model``'s state;
    integer buffers (BatchNorm's step counters) are copied as they are."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def _decay_now(self) -> float:
        # A fixed decay would keep the untrained start in the average of a short run: ramped
        # up, the average weighs about the last tenth of the steps until 10 / (1 - decay) of them.
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self._decay_now()
        self.updates += 1
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.lerp_(v, 1.0 - d)
            else:
                s.copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Put the averaged weights into ``model`` (keeping its layout and device)."""
        for k, v in model.state_dict().items():
            v.copy_(self.shadow[k])

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` holds the averaged weights inside the block, its own again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(own[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"the saved weight average does not match the model (keys {sorted(missing)[:3]})")
        self.updates = state["updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

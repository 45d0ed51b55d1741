"""Meta-Experience Replay (Riemer et al., ICLR 2019), in its Reptile form (Nichol et al., 2018)."""

from __future__ import annotations

import torch

from everseg.learn.strategies.base import Strategy


class MetaReplay(Strategy):
    """Reptile meta-updates over batches that mix new and replayed images.

    Every ``inner_steps`` optimiser steps, the weights are pulled back towards those at
    the start of the round: ``theta <- theta_0 + beta (theta - theta_0)``. Over mixed
    batches this favours updates whose gradients agree across new and old data (MER's
    aim: more transfer, less interference). Use it with ``replay`` (``mer+replay``);
    alone it is Reptile over the new data.

    Args:
        inner_steps: optimiser steps per meta-update (MER: batches per "within-batch" round).
        beta: meta learning rate (MER: 0.03 ... 1; 0.5 here; 1 = plain training).
    """

    name = "mer"

    def __init__(self, inner_steps: int = 4, beta: float = 0.5):
        super().__init__()
        if inner_steps < 1 or not 0 < beta <= 1:
            raise ValueError("mer needs inner_steps >= 1 and 0 < beta <= 1")
        self.inner_steps, self.beta = inner_steps, beta
        self._start: list[torch.Tensor] | None = None
        self._steps_at_start = 0

    def _snapshot(self, trainer) -> None:
        self._start = [p.detach().clone() for p in trainer.model.parameters()]
        self._steps_at_start = trainer.global_step

    def on_fit_start(self, trainer) -> None:
        self._snapshot(trainer)

    @torch.no_grad()
    def after_step(self, trainer, batch, output) -> None:
        if trainer.global_step - self._steps_at_start < self.inner_steps:
            return
        for p, p0 in zip(trainer.model.parameters(), self._start):
            p.copy_(p0 + self.beta * (p - p0))
        self._snapshot(trainer)

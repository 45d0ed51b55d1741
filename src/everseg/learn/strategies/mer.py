"""Meta-Experience Replay (Riemer et al., ICLR 2019, Algorithm 1), and its cheap Reptile form."""

from __future__ import annotations

import torch

from everseg.learn.plugins import Batch
from everseg.learn.strategies.base import Strategy
from everseg.learn.strategies.replay import Replay


def _snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@torch.no_grad()
def _interpolate(model, start: list[torch.Tensor], rate: float) -> None:
    """``theta <- start + rate (theta - start)``: a Reptile meta-update towards where training went."""
    for p, p0 in zip(model.parameters(), start):
        p.copy_(p0 + rate * (p - p0))


class MetaExperienceReplay(Replay):
    """MER as published: for each incoming batch, ``batches`` batches of ``memory_per_batch``
    stored images plus the incoming batch; within each, one SGD step per stored image (one
    example at a time) and one on the incoming batch, then the within-batch meta-update
    ``theta <- theta_0 + beta (theta - theta_0)``; after all of them the across-batch one with
    ``gamma``. Over many small steps this favours updates whose gradients agree across new and
    remembered images: more transfer, less interference.

    It owns a memory like replay (loaded with the base model, saved with every step's model), so
    it does not combine with ``replay``. The steps are the recipe's optimiser at the current
    learning rate (the paper's alpha: plain SGD), and every other strategy's hooks apply to each
    of them. The incoming batch is the last example of each batch, so the training loop's own
    step is the last step of the last batch; with ``train.batch_size`` 1 an incoming batch is one
    example, as in the paper. Each loop step costs ``batches x (memory_per_batch + 1)`` optimiser
    steps, so under a time budget MER sees fewer new images than replay does.

    Args:
        batches: batches per incoming batch (the paper's s).
        memory_per_batch: stored images per batch (the paper's k - 1).
        beta: within-batch meta learning rate (1: no meta-update).
        gamma: across-batch meta learning rate (1: no meta-update, the paper's usual choice).
        memory_size, memory_policy, stale_background, seed: the memory's, as for ``replay``
            (the paper's memory is a reservoir).
    """

    name = "mer"

    def __init__(self, batches: int = 2, memory_per_batch: int = 3, beta: float = 0.3, gamma: float = 1.0,
                 seed: int = 0, stale_background: str = "ignore", memory_size: int = 20,
                 memory_policy: str = "reservoir"):
        super().__init__(seed=seed, stale_background=stale_background, memory_size=memory_size,
                         memory_policy=memory_policy)
        if batches < 1 or memory_per_batch < 1 or not 0 < beta <= 1 or not 0 < gamma <= 1:
            raise ValueError("mer needs batches >= 1, memory_per_batch >= 1, 0 < beta <= 1 and 0 < gamma <= 1")
        self.batches, self.memory_per_batch, self.beta, self.gamma = batches, memory_per_batch, beta, gamma
        self._start: list[torch.Tensor] | None = None  # theta_0 of the across-batch update
        self._last_batch_start: list[torch.Tensor] | None = None  # theta_0 of the batch the loop's step ends
        self._nested = False  # inside our own per-example steps: the batch hooks must not recurse
        self.inner_steps = 0  # optimiser steps MER took besides the loop's (for the record)

    def on_fit_start(self, trainer) -> None:
        super().on_fit_start(trainer)
        self._start = self._last_batch_start = None

    def before_forward(self, trainer, batch: Batch) -> None:
        if self._nested or self.memory is None or len(self.memory) == 0:
            return
        model, size = trainer.model, batch.image.shape[-2:]
        incoming = Batch(batch.image, batch.mask, list(batch.stems), dict(batch.extra))
        self._start = _snapshot(model)
        self._nested = True
        try:
            for b in range(self.batches):
                batch_start = self._start if b == 0 else _snapshot(model)
                for _ in range(self.memory_per_batch):
                    trainer.nested_step(self.memory_batch(trainer, 1, size))
                    self.inner_steps += 1
                if b + 1 < self.batches:
                    trainer.nested_step(Batch(incoming.image, incoming.mask.clone(), list(incoming.stems),
                                              dict(incoming.extra)))
                    self.inner_steps += 1
                    _interpolate(model, batch_start, self.beta)
                else:
                    self._last_batch_start = batch_start  # the loop's own step ends this batch
        finally:
            self._nested = False

    def after_step(self, trainer, batch, output) -> None:
        if self._nested or self._last_batch_start is None:
            return
        _interpolate(trainer.model, self._last_batch_start, self.beta)
        if self.gamma < 1:
            _interpolate(trainer.model, self._start, self.gamma)
        self._last_batch_start = None


class Reptile(Strategy):
    """Reptile meta-updates (Nichol et al., 2018) over the loop's own batches, every
    ``inner_steps`` optimiser steps: ``theta <- theta_0 + beta (theta - theta_0)``.

    What everseg called ``mer`` until MER itself was added: no per-example steps, so it costs
    nothing extra. Over batches that mix new and replayed images (``reptile+replay``) it keeps
    MER's aim at a fraction of its cost; alone it is Reptile over the new data.

    Args:
        inner_steps: optimiser steps per meta-update.
        beta: meta learning rate (1 = plain training).
    """

    name = "reptile"

    def __init__(self, inner_steps: int = 4, beta: float = 0.5):
        super().__init__()
        if inner_steps < 1 or not 0 < beta <= 1:
            raise ValueError("reptile needs inner_steps >= 1 and 0 < beta <= 1")
        self.inner_steps, self.beta = inner_steps, beta
        self._start: list[torch.Tensor] | None = None
        self._steps_at_start = 0

    def _snapshot(self, trainer) -> None:
        self._start = _snapshot(trainer.model)
        self._steps_at_start = trainer.global_step

    def on_fit_start(self, trainer) -> None:
        self._snapshot(trainer)

    def after_step(self, trainer, batch, output) -> None:
        if trainer.global_step - self._steps_at_start < self.inner_steps:
            return
        _interpolate(trainer.model, self._start, self.beta)
        self._snapshot(trainer)

"""Fine-tuning modes as plugins: frozen backbone and gradual unfreezing.

Full fine-tuning needs no plugin; discriminative learning rates are
``optim.backbone_lr_factor`` (see :mod:`everseg.learn.optim`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from everseg.learn.plugins import Plugin

if TYPE_CHECKING:
    from everseg.learn.trainer import Trainer


class FrozenBackbone(Plugin):
    """Train only the decoder and classifier; the backbone, its norm statistics included, stays fixed."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        trainer.model.freeze_backbone(True)


class GradualUnfreeze(Plugin):
    """Start with a frozen backbone and unfreeze it from the deepest layers down (Howard & Ruder, 2018, ULMFiT).

    The backbone's parameters, in definition order (shallow to deep), are cut into
    ``chunks`` pieces; every ``every`` epochs one more piece, deepest first, starts
    training. Normalisation layers whose weights are frozen keep their running statistics.
    """

    def __init__(self, every: int = 3, chunks: int = 3):
        if every < 1 or chunks < 1:
            raise ValueError("gradual unfreezing needs every >= 1 and chunks >= 1")
        self.every = every
        self.chunks = chunks

    def _chunks(self, backbone: nn.Module) -> list[list[nn.Module]]:
        leaves = [m for m in backbone.modules() if any(True for _ in m.parameters(recurse=False))]
        size = -(-len(leaves) // self.chunks)
        return [leaves[i:i + size] for i in range(0, len(leaves), size)]

    def unfrozen_chunks(self, epoch: int) -> int:
        return min(self.chunks, epoch // self.every)

    def on_epoch_start(self, trainer: "Trainer") -> None:
        chunks = self._chunks(trainer.model.backbone)
        n_open = self.unfrozen_chunks(trainer.epoch)
        for i, chunk in enumerate(chunks):
            trainable = i >= len(chunks) - n_open
            for module in chunk:
                for p in module.parameters(recurse=False):
                    p.requires_grad_(trainable)
                if isinstance(module, _NormBase) and not trainable:
                    module.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "chunks": self.chunks}

"""Output and feature distillation from the previous step's model: LwF and ILT."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from everseg.learn.plugins import Batch, StepOutput
from everseg.learn.strategies.base import Strategy


def output_distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-pixel cross-entropy between the old model's softened probabilities and the new
    model's on the old classes, averaged over pixels (LwF's modified cross-entropy)."""
    n_old = old_logits.shape[1]
    q = (old_logits.float() / temperature).softmax(1)
    log_p = (new_logits[:, :n_old].float() / temperature).log_softmax(1)
    return -(q * log_p).sum(1).mean()


class LwF(Strategy):
    """Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

    Adds ``weight * T^2 * CE(softmax(old / T), softmax(new[:old] / T))`` per pixel: the new
    model keeps answering like the old one on the old classes.

    Args:
        weight: strength of the distillation term (paper: 1).
        temperature: softening temperature T (paper: 2).
    """

    name = "lwf"
    reuses_backbone = True

    def __init__(self, weight: float = 1.0, temperature: float = 2.0):
        super().__init__()
        self.weight, self.temperature = weight, temperature

    def loss_terms(self, trainer, batch: Batch, output: StepOutput) -> dict[str, torch.Tensor]:
        if self.old_model is None:
            return {}
        old = self.old_outputs(batch.image, trainer=trainer, output=output)
        kd = output_distillation(output.logits, old, self.temperature)
        return {"lwf": self.weight * self.temperature ** 2 * kd}


class ILT(Strategy):
    """Incremental Learning Techniques for segmentation (Michieli & Zanuttigh, ICCVW 2019).

    Distils both the output (as LwF, T = 1) and the encoder's deepest features (mean
    squared difference), keeping the feature space the decoder was trained on.

    Args:
        output_weight: weight of the output distillation (paper: 1 ... 100 by setting; 1 here).
        feature_weight: weight of the feature L2 term (paper: 1 ... 10; 1 here).
    """

    name = "ilt"
    needs_features = True

    def __init__(self, output_weight: float = 1.0, feature_weight: float = 1.0):
        super().__init__()
        self.output_weight, self.feature_weight = output_weight, feature_weight

    def loss_terms(self, trainer, batch: Batch, output: StepOutput) -> dict[str, torch.Tensor]:
        if self.old_model is None:
            return {}
        old_logits, old_feats = self.old_outputs(batch.image, features=True, trainer=trainer, output=output)
        new_feat = output.features["backbone"][-1].float()
        feat = F.mse_loss(new_feat, old_feats["backbone"][-1].float())
        out = output_distillation(output.logits, old_logits, 1.0)
        return {"ilt_features": self.feature_weight * feat, "ilt_output": self.output_weight * out}

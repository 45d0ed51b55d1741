"""PLOP: Pseudo-label and LOcal POD (Douillard et al., CVPR 2021).

(1) Local POD distils the *statistics* of intermediate features rather than the features
themselves: each squared feature map is summed along its width and along its height
(POD embeddings, PODNet), inside windows at several scales (1x1, 2x2, 4x4 grids), each
embedding L2-normalised; the loss is the L2 distance between old and new embeddings,
averaged over windows, scales and layers. (2) Background pixels are pseudo-labelled with
the old model's prediction where it is confident - normalised entropy below the median
entropy of its predicted class, measured on the step's images before training - and
set to ignore where it is not.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from everseg.learn.plugins import Batch, StepOutput
from everseg.learn.strategies.base import Strategy


def pod_embedding(feature: torch.Tensor, scales: tuple[int, ...] = (1, 2, 4)) -> list[list[torch.Tensor]]:
    """Local POD embeddings of ``feature`` (N x C x H x W): per scale, one N x K tensor per window
    (the last row/column of windows takes the remainder, so K can differ between windows)."""
    x = feature.float().pow(2)
    n, c, h, w = x.shape
    out = []
    for s in scales:
        hs, ws = max(1, h // s), max(1, w // s)
        parts = []
        for i in range(s):
            for j in range(s):
                win = x[:, :, i * hs:(i + 1) * hs if i < s - 1 else h, j * ws:(j + 1) * ws if j < s - 1 else w]
                if win.numel() == 0:
                    continue
                emb = torch.cat([win.sum(2).flatten(1), win.sum(3).flatten(1)], dim=1)  # width-, height-pooled
                parts.append(F.normalize(emb, dim=1))
        out.append(parts)
    return out


def local_pod_loss(new_feats: list[torch.Tensor], old_feats: list[torch.Tensor],
                   scales: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    total = new_feats[0].new_zeros((), dtype=torch.float32)
    for new, old in zip(new_feats, old_feats):
        per_scale = [torch.stack([torch.linalg.vector_norm(a - b, dim=-1).mean() for a, b in zip(wa, wb)]).mean()
                     for wa, wb in zip(pod_embedding(new, scales), pod_embedding(old, scales))]
        total = total + torch.stack(per_scale).mean()
    return total / len(new_feats)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of per-pixel class probabilities (N x C x H x W) divided by log C: values in [0, 1]."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(probs.shape[1])


def pseudo_label(target: torch.Tensor, old_logits: torch.Tensor, thresholds: torch.Tensor,
                 ignore_index: int = 255) -> torch.Tensor:
    """Background pixels (0) take the old model's class where its entropy is under that class's
    threshold, and become ignore where it is not; other pixels are unchanged."""
    probs = old_logits.float().softmax(1)
    pred = probs.argmax(1)
    confident = normalized_entropy(probs) < thresholds.to(probs.device)[pred]
    bg = target == 0
    out = target.clone()
    out[bg & confident] = pred[bg & confident]
    out[bg & ~confident] = ignore_index
    return out


class PLOP(Strategy):
    """Local POD on every backbone stage and the decoder output, plus entropy pseudo-labels.

    Args:
        pod_weight: weight of the local POD term (paper: 0.01).
        scales: window grids of local POD (paper: 1, 2, 4 ... i.e. 3 scales).
        max_threshold: cap on the per-class entropy thresholds (paper: 0.001 quantile options; 1 = no cap).
        threshold_images: at most this many of the step's images, evenly spread, estimate the
            thresholds (a median needs far fewer pixels than a whole dataset has; the pass
            counts against the step's time budget).
    """

    name = "plop"
    needs_features = True

    def __init__(self, pod_weight: float = 0.01, scales: tuple[int, ...] = (1, 2, 4), max_threshold: float = 1.0,
                 threshold_images: int = 64):
        super().__init__()
        self.pod_weight, self.scales, self.max_threshold = pod_weight, tuple(scales), max_threshold
        self.threshold_images = threshold_images
        self.thresholds: torch.Tensor | None = None

    @torch.no_grad()
    def on_fit_start(self, trainer) -> None:
        self.thresholds = None
        if self.old_model is None or not self.ctx.background_shift:
            return  # pseudo-labels fill in background; without a background shift label 0 is a real class
        # One pass over the step's images (no augmentation) to find each class's median entropy.
        entropies: list[list[np.ndarray]] = [[] for _ in range(self.ctx.old_num_classes)]
        data = trainer.train_set.with_transform(None)
        picks = np.unique(np.linspace(0, len(data) - 1, min(len(data), max(1, self.threshold_images))).round())
        for i in picks.astype(int).tolist():
            x = data[i]["image"][None].to(trainer.device).float() / 255.0
            with trainer.autocast():
                logits = self.old_model(x)
            probs = logits.float().softmax(1)
            ent, pred = normalized_entropy(probs)[0].cpu(), probs.argmax(1)[0].cpu()
            for c in pred.unique().tolist():
                entropies[c].append(ent[pred == c].numpy())
        thr = [float(np.median(np.concatenate(e))) if e else 0.0 for e in entropies]
        self.thresholds = torch.tensor(thr).clamp(max=self.max_threshold)

    def before_forward(self, trainer, batch: Batch) -> None:
        if self.old_model is None or self.thresholds is None:
            return
        old_logits, old_feats = self.old_outputs(batch.image, features=True)
        batch.mask = pseudo_label(batch.mask, old_logits, self.thresholds,
                                  trainer.train_set.label_space.ignore_index)
        batch.extra["plop_old_features"] = old_feats

    def loss_terms(self, trainer, batch: Batch, output: StepOutput) -> dict[str, torch.Tensor]:
        if self.old_model is None:
            return {}
        old = batch.extra.get("plop_old_features")
        if old is None or old["decoder"].shape[0] != batch.image.shape[0]:
            old = self.old_outputs(batch.image, features=True)[1]
        new_list = list(output.features["backbone"]) + [output.features["decoder"]]
        old_list = list(old["backbone"]) + [old["decoder"]]
        return {"plop_pod": self.pod_weight * local_pod_loss(new_list, old_list, self.scales)}

    def state_dict(self):
        return {"thresholds": None if self.thresholds is None else self.thresholds.tolist()}

"""PLOP: Pseudo-label and LOcal POD (Douillard et al., CVPR 2021), as its authors' code runs it.

(1) Local POD distils the *statistics* of intermediate features rather than the features
themselves: each squared feature map is averaged along its width and along its height
(POD embeddings, PODNet), inside windows at several scales (1x1, 2x2, 4x4 grids); the
windows' embeddings are joined into one vector per image and the loss is the L2 distance
between the old and the new model's vectors, averaged over the batch. It is applied to every
backbone stage and the decoder output (weight 0.01) and to the logits before upsampling
(weight 0.0005; the new classes' logits are summed into the background's, so both models
have the old classes' channels), averaged over those layers and scaled by
sqrt(classes now / classes new in this step): the fewer classes a step adds, the more it
must keep. (2) Background pixels are pseudo-labelled with the old model's prediction where
it is confident - normalised entropy below the median entropy of its predicted class,
measured on the step's images before training - and set to ignore where it is not; each
image's cross-entropy is then weighted by the share of its background pixels that were
confident (the "classification adaptive factor"). (3) New classifier rows start as copies
of the background row, MiB's initialisation (the authors' ``--init_balanced``, in every PLOP
command they publish).

Where this differs from the authors' code: windows follow the feature map's height and
width (theirs cut the height by the width's window size), an image without background
pixels keeps weight 1 (theirs gives it 0), and the old model's features for POD are
computed with the BatchNorm statistics the trained model uses (``batch_statistics``). Theirs
normalise the trained model's features by each batch's statistics and the old model's by its
running ones; at a batch of 8 that difference alone made POD 5-9 times the segmentation loss
before a single weight had moved (the decoder's embeddings 386 apart, the logits' 1,505, with
identical weights), and its gradient worked on that difference rather than on keeping what
the old model computes. (Keeping the trained model on running statistics
instead removes BatchNorm's normalisation from training: at the default later-step LR the
loss diverged within 10 batches.)
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from everseg.learn.plugins import Batch, StepOutput
from everseg.learn.strategies.base import Strategy


@functools.lru_cache(maxsize=64)  # a few map sizes per run, asked for at every training step
def segment_means(length: int, scales: tuple[int, ...]) -> torch.Tensor:
    """``length`` x K matrix whose columns average the segments of ``[0, length)`` that each
    scale's grid cuts (s segments of ``length // s``, the last taking the remainder; empty
    segments left out)."""
    columns = []
    for s in scales:
        size = max(1, length // s)
        for i in range(s):
            lo, hi = i * size, min(length, (i + 1) * size if i < s - 1 else length)
            if hi > lo:
                column = torch.zeros(length)
                column[lo:hi] = 1.0 / (hi - lo)
                columns.append(column)
    return torch.stack(columns, dim=1)


def pod_embedding(feature: torch.Tensor, scales: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """Local POD embedding of ``feature`` (N x C x H x W): N x K, the width- and height-means of
    the squared map in each window of each scale's grid (the last row/column of windows takes
    the remainder), joined.

    A window's width-means are the rows' means over its column segment, its height-means the
    columns' means over its row segment, and every row and column lies in one segment per
    scale; so the windows' embeddings together are, in another order, every row's mean over
    every column segment and every column's mean over every row segment: two matrix products.
    The L2 distance POD takes does not depend on the order. (Slicing each window instead made
    PLOP's backward pass 2.9 times MiB's: every slice's gradient is a whole map of zeros.)
    """
    x = feature.float().pow(2)
    h, w = x.shape[-2:]
    along_width = x @ segment_means(w, tuple(scales)).to(x.device)  # N x C x H x segments
    along_height = x.transpose(-1, -2) @ segment_means(h, tuple(scales)).to(x.device)  # N x C x W x segments
    return torch.cat([along_width.flatten(1), along_height.flatten(1)], dim=1)


def local_pod_loss(new_feats: list[torch.Tensor], old_feats: list[torch.Tensor],
                   scales: tuple[int, ...] = (1, 2, 4), weights: list[float] | None = None) -> torch.Tensor:
    """Mean over layers of ``weight x`` the batch's mean L2 distance between POD embeddings."""
    weights = weights if weights is not None else [1.0] * len(new_feats)
    total = new_feats[0].new_zeros((), dtype=torch.float32)
    for new, old, weight in zip(new_feats, old_feats, weights):
        if new is old:
            # A frozen backbone shared with the old model (Strategy.old_outputs) gives both the
            # same tensor: its distance is 0 and has no gradient (its embeddings cost 40 ms of a
            # 3-s step on one CPU thread). It still counts in the mean, as in the authors' loss.
            continue
        dist = torch.linalg.vector_norm(pod_embedding(new, scales) - pod_embedding(old, scales), dim=1)
        total = total + weight * dist.mean()
    return total / len(new_feats)


def logits_as_old(new_logits: torch.Tensor, old_classes: int) -> torch.Tensor:
    """The new model's logits on the old model's channels: the new classes' summed into background's."""
    return torch.cat([new_logits[:, :1] + new_logits[:, old_classes:].sum(1, keepdim=True),
                      new_logits[:, 1:old_classes]], dim=1)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of per-pixel class probabilities (N x C x H x W) divided by log C: values in [0, 1]."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(probs.shape[1])


def pseudo_label(target: torch.Tensor, old_logits: torch.Tensor, thresholds: torch.Tensor,
                 ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Background pixels (0) take the old model's class where its entropy is under that class's
    threshold, and become ignore where it is not; other pixels are unchanged. Also returns each
    image's share of background pixels that were confident (1 for an image without background)."""
    probs = old_logits.float().softmax(1)
    pred = probs.argmax(1)
    confident = normalized_entropy(probs) < thresholds.to(probs.device)[pred]
    bg = target == 0
    out = target.clone()
    out[bg & confident] = pred[bg & confident]
    out[bg & ~confident] = ignore_index
    background = bg.flatten(1).sum(1)
    share = (bg & confident).flatten(1).sum(1).float() / background.clamp_min(1)
    return out, torch.where(background > 0, share, torch.ones_like(share))


@contextlib.contextmanager
def statistics_as(model: nn.Module, reference: nn.Module):
    """Within the block, each BatchNorm layer of ``model`` normalises as the same-named layer
    of ``reference`` does: by the batch's statistics where that one is in train mode. Running
    statistics stay as they are (momentum 0). Yields whether any layer changed mode."""
    modes = {name: m.training for name, m in reference.named_modules() if isinstance(m, _BatchNorm)}
    changed = [(m, m.momentum) for name, m in model.named_modules()
               if isinstance(m, _BatchNorm) and m.track_running_stats and modes.get(name, m.training) != m.training]
    try:
        for m, _ in changed:
            m.train(not m.training)
            m.momentum = 0.0
        yield bool(changed)
    finally:
        for m, momentum in changed:
            m.train(not m.training)
            m.momentum = momentum


class PLOP(Strategy):
    """Local POD on every backbone stage, the decoder output and the logits, plus entropy
    pseudo-labels whose share weights each image's cross-entropy.

    Args:
        pod_weight: weight of local POD on the features (paper: 0.01).
        logits_weight: weight of local POD on the logits (paper: 0.0005).
        scales: window grids of local POD (paper: 1, 2, 4).
        adaptive_factor: weight each image's cross-entropy by its share of confident
            background pixels (paper: on).
        max_threshold: cap on the per-class entropy thresholds (1 = no cap).
        threshold_images: at most this many of the step's images, evenly spread, estimate the
            thresholds (a median needs far fewer pixels than a whole dataset has; the pass
            counts against the step's time budget).
        init: how new classifier rows start: ``"background"`` (MiB's, as published) or
            ``"random"``.
        batch_statistics: run the old model's BatchNorm layers for POD as the trained model's
            run (a batch's statistics where it trains them; their running statistics are left
            alone), so that POD compares the two models computing the same way. Its
            pseudo-labels still come from the old model in eval mode.
    """

    name = "plop"
    reuses_backbone = True

    def __init__(self, pod_weight: float = 0.01, logits_weight: float = 0.0005, scales: tuple[int, ...] = (1, 2, 4),
                 adaptive_factor: bool = True, max_threshold: float = 1.0, threshold_images: int = 64,
                 init: str = "background", batch_statistics: bool = True):
        super().__init__()
        if init not in ("background", "random"):
            raise ValueError(f"plop.init must be 'background' or 'random', not {init!r}")
        self.head_init = init
        self.batch_statistics = batch_statistics
        self.pod_weight, self.logits_weight, self.scales = pod_weight, logits_weight, tuple(scales)
        self.adaptive_factor, self.max_threshold = adaptive_factor, max_threshold
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

    def after_forward(self, trainer, batch: Batch, output: StepOutput) -> None:
        # After the forward pass rather than before it, so that with a frozen backbone the old
        # model runs only its decoder on the trained model's features (the masks are not
        # needed until the loss).
        if self.old_model is None:
            return
        old_logits, old_feats = self.old_outputs(batch.image, features=True, trainer=trainer, output=output)
        if self.batch_statistics:
            with statistics_as(self.old_model, trainer.model) as changed:
                if changed:
                    _, old_feats = self.old_outputs(batch.image, features=True, trainer=trainer, output=output)
        batch.extra["plop_old_features"] = old_feats
        if self.thresholds is None:
            return
        batch.mask, confident_share = pseudo_label(batch.mask, old_logits, self.thresholds,
                                                   trainer.train_set.label_space.ignore_index)
        batch.extra["plop_confident_share"] = confident_share

    def shape_loss(self, trainer, batch: Batch, output: StepOutput, shape) -> None:
        share = batch.extra.get("plop_confident_share")
        if self.adaptive_factor and share is not None:
            shape.weight_images(share, self.name)

    def loss_terms(self, trainer, batch: Batch, output: StepOutput) -> dict[str, torch.Tensor]:
        if self.old_model is None:
            return {}
        old = batch.extra["plop_old_features"]
        old_classes = self.ctx.old_num_classes
        layers = len(output.features["backbone"]) + 1
        new_list = [*output.features["backbone"], output.features["decoder"],
                    logits_as_old(output.features["logits"], old_classes)]
        old_list = [*old["backbone"], old["decoder"], old["logits"]]
        weights = [self.pod_weight] * layers + [self.logits_weight]
        now = output.logits.shape[1]
        # The authors' schedule: the fewer classes this step adds, the more the old ones weigh
        # (a domain step adds none and keeps weight 1).
        schedule = math.sqrt(now / (now - old_classes)) if now > old_classes else 1.0
        return {"plop_pod": schedule * local_pod_loss(new_list, old_list, self.scales, weights)}

    def state_dict(self):
        return {"thresholds": None if self.thresholds is None else self.thresholds.tolist()}

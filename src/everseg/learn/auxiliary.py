"""An auxiliary head for training: deep supervision of the backbone's middle (``loss.aux_weight``).

A small head classifies every pixel from the backbone's second-deepest feature map, and its
cross-entropy, weighted by ``loss.aux_weight``, joins the step's loss (PSPNet, Zhao et al.
2017, sec. 3.3, with a weight of 0.4). The middle of the backbone then gets a gradient of its own,
not only what flows back through the deepest stage and the decoder.

The head belongs to the Trainer, not to the model: it is made when training starts, trained with
the decoder's learning rate, kept in the checkpoint for a resume and dropped at the end. Saved
models, inference, export and the incremental steps never see it. A step whose backbone is frozen
gets no head (its gradient would reach nothing but the head itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AuxiliaryHead(nn.Module):
    """3x3 conv, BatchNorm, ReLU, dropout, 1x1 classifier (PSPNet's and mmsegmentation's FCN head,
    narrower: its width follows the feature map's, at least 64 and at most 256 channels)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        width = max(64, min(256, in_channels))
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(width, num_classes, kernel_size=1),
        )

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits at ``size`` (the labels' height and width) from the feature map."""
        return F.interpolate(self.block(features), size=size, mode="bilinear", align_corners=False)


def supervised_stage(backbone: nn.Module) -> int:
    """Which of the backbone's feature maps the head reads: the second deepest (ResNet's layer3,
    MobileNetV2's 96-channel stage, both at the deepest stage's stride under output stride 16)."""
    channels = getattr(backbone, "channels", None)
    if not channels or len(channels) < 2:
        raise ValueError("loss.aux_weight needs a backbone with at least two feature stages")
    return len(channels) - 2


def auxiliary_head(model: nn.Module) -> tuple[AuxiliaryHead, int]:
    """A new head for ``model`` (a Segmenter) and the index of the feature map it reads."""
    stage = supervised_stage(model.backbone)
    return AuxiliaryHead(model.backbone.channels[stage], model.num_classes), stage

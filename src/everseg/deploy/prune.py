"""Structured channel pruning: the same architecture with fewer channels per layer.

Why Torch-Pruning (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023)
rather than a pruner of our own: removing a channel is only correct when every layer
coupled to it loses it too. MobileNetV2's residual additions tie the channels of all the
blocks they join, ASPP and the DeepLabV3+ / LR-ASPP decoders concatenate branches,
depthwise convolutions tie their input to their output, BatchNorms follow their
convolutions. Torch-Pruning traces the model once and groups coupled channels for any
graph, timm backbones included, where a hand-written pruner would have to know every
architecture's couplings.

What is removed: in each group, the channels with the smallest L2 weight norm (summed
over the group's layers), ``ratio`` of them per layer, widths rounded to multiples of 8
(what vector units and oneDNN's blocked layouts handle best). The classifier's outputs
(the classes) and the image input are never pruned. A pruned model keeps its
architecture's name; ``config.pruned`` says its widths come from its weights
(:mod:`everseg.models.widths`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

ROUND_TO = 8


def prune_channels(model: nn.Module, ratio: float, *, example_size: tuple[int, int] = (256, 256)) -> nn.Module:
    """Remove ``ratio`` (0 < ratio < 1) of the channels of every prunable layer of ``model``, in place.

    The model is traced on one ``example_size`` image in eval mode (BatchNorm statistics
    are not touched). Returns ``model``, its ``config.pruned`` updated.
    """
    import torch_pruning as tp

    from everseg.models.widths import refresh_widths

    if not 0 < ratio < 1:
        raise ValueError(f"--prune must be a share of channels between 0 and 1 (exclusive), got {ratio}")
    training = model.training
    model.eval()
    param = next(model.parameters())
    example = torch.rand(1, 3, *example_size, dtype=param.dtype, device=param.device)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model.classifier], round_to=ROUND_TO)
    pruner.step()
    refresh_widths(model)
    before = float(getattr(model.config, "pruned", 0.0))
    model.config = dataclasses.replace(model.config, pruned=1 - (1 - before) * (1 - ratio))
    model.train(training)
    return model


def count_macs(model: nn.Module, size: tuple[int, int] = (360, 480)) -> float:
    """Multiply-accumulates of one forward pass on a ``size`` image (PyTorch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    x = torch.rand(1, 3, *size, dtype=param.dtype, device=param.device)
    training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(training)
    return counter.get_total_flops() / 2

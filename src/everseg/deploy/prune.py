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
(what vector units and oneDNN's blocked layouts handle best). The decoder may lose a
larger share than the backbone (``decoder_ratio``): in DeepLabV3+ / MobileNetV2 the
decoder's stride-4 fuse convolutions hold 44 % of the MACs at 360x480 while the backbone's
ImageNet features are what a short fine-tuning cannot rebuild. Channels the decoder shares
with the backbone (the backbone's last output, which the ASPP reads) take the decoder's share. On the CamVid teacher of
benchmarks/README.md, at the same 2.3x fewer MACs, backbone 0.2 + decoder 0.6 kept 21.7
mIoU on 40 val images straight after pruning (BatchNorm statistics re-estimated), every
layer 0.4 kept 11.8. The classifier's outputs
(the classes) and the image input are never pruned. A pruned model keeps its
architecture's name; ``config.pruned`` says its widths come from its weights
(:mod:`everseg.models.widths`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

ROUND_TO = 8


def check_ratios(ratio: float, decoder_ratio: float | None = None) -> None:
    """Refuse shares outside [0, 1) and a pruning that removes nothing, naming the option."""
    for option, value in (("--prune", ratio), ("--prune-decoder", decoder_ratio)):
        if value is not None and not 0 <= value < 1:
            raise ValueError(f"{option} must be a share of channels between 0 and 1 (1 excluded), got {value}")
    if ratio == 0 and not decoder_ratio:
        raise ValueError("--prune 0 removes nothing: give a share above 0 (or --prune-decoder)")


def conv_channels(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def prune_channels(model: nn.Module, ratio: float, *, decoder_ratio: float | None = None,
                   example_size: tuple[int, int] = (256, 256)) -> nn.Module:
    """Remove ``ratio`` (0 <= ratio < 1) of the channels of every prunable layer of ``model``, in place;
    ``decoder_ratio`` of the decoder's instead when given.

    The model is traced on one ``example_size`` image in eval mode (BatchNorm statistics
    are not touched). Returns ``model``, its ``config.pruned`` updated to the share of all
    convolution channels removed so far.
    """
    import torch_pruning as tp

    from everseg.models.widths import refresh_widths

    check_ratios(ratio, decoder_ratio)
    channels = conv_channels(model)
    training = model.training
    model.eval()
    param = next(model.parameters())
    example = torch.rand(1, 3, *example_size, dtype=param.dtype, device=param.device)
    # A group of coupled channels takes one ratio for all its layers: the backbone's last
    # output, which the ASPP's depthwise convolutions read, goes with the decoder's share.
    per_part = {model.decoder: decoder_ratio} if decoder_ratio is not None else None
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, pruning_ratio_dict=per_part,
                                  ignored_layers=[model.classifier], round_to=ROUND_TO)
    pruner.step()
    refresh_widths(model)
    before = float(getattr(model.config, "pruned", 0.0))
    removed = 1 - conv_channels(model) / channels
    model.config = dataclasses.replace(model.config, pruned=round(1 - (1 - before) * (1 - removed), 4))
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

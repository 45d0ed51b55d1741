"""Models whose layers are narrower than their architecture's: pruned models.

Structured pruning (``everseg compress``) removes channels from convolutions and their
BatchNorms, so a pruned model cannot be rebuilt from its :class:`ModelConfig` alone. Its
saved weights carry every layer's shape, though: :func:`fit_widths_to_state` narrows a
freshly built model of the same architecture to those shapes, after which the weights load
as usual. Only convolutions, BatchNorms and linear layers can change width; a pruned
model holding any other parameter whose shape changed is refused.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def _empty_like(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.empty(shape, dtype=t.dtype, device=t.device)


def _fit_conv(conv: nn.Conv2d, name: str, weight_shape: torch.Size) -> None:
    out_ch, in_per_group = int(weight_shape[0]), int(weight_shape[1])
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if depthwise:
        if in_per_group != 1 or out_ch < 1:
            raise ValueError(f"{name}: saved weight {tuple(weight_shape)} is not a depthwise convolution's")
        conv.groups = conv.in_channels = conv.out_channels = out_ch
    elif conv.groups == 1:
        conv.in_channels, conv.out_channels = in_per_group, out_ch
    else:
        raise ValueError(f"{name}: grouped convolutions ({conv.groups} groups) cannot change width")
    conv.weight = nn.Parameter(_empty_like(conv.weight, weight_shape))
    if conv.bias is not None:
        conv.bias = nn.Parameter(_empty_like(conv.bias, torch.Size([out_ch])))


def _fit_norm(norm: nn.BatchNorm2d, width: int) -> None:
    norm.num_features = width
    for attr in ("weight", "bias"):
        p = getattr(norm, attr)
        if p is not None:
            setattr(norm, attr, nn.Parameter(_empty_like(p, torch.Size([width]))))
    for attr in ("running_mean", "running_var"):
        b = getattr(norm, attr)
        if b is not None:
            setattr(norm, attr, _empty_like(b, torch.Size([width])))


def _fit_linear(linear: nn.Linear, weight_shape: torch.Size) -> None:
    linear.out_features, linear.in_features = int(weight_shape[0]), int(weight_shape[1])
    linear.weight = nn.Parameter(_empty_like(linear.weight, weight_shape))
    if linear.bias is not None:
        linear.bias = nn.Parameter(_empty_like(linear.bias, torch.Size([weight_shape[0]])))


def fit_widths_to_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Narrow ``model``'s layers in place to the shapes of ``state`` (a pruned model's weights).

    Raises ``ValueError`` naming the layer when a shape cannot be matched.
    """
    own = model.state_dict()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        key = prefix + "weight"
        if key not in state or key not in own or state[key].shape == own[key].shape:
            continue
        shape = state[key].shape
        if isinstance(module, nn.Conv2d) and len(shape) == 4:
            _fit_conv(module, key, shape)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and len(shape) == 1:
            _fit_norm(module, int(shape[0]))
        elif isinstance(module, nn.Linear) and len(shape) == 2:
            _fit_linear(module, shape)
        else:
            raise ValueError(f"{key}: a {type(module).__name__} cannot take the saved shape {tuple(shape)}")
    refresh_widths(model)


@torch.no_grad()
def refresh_widths(model: nn.Module) -> None:
    """Bring the width attributes other code reads (``decoder.out_channels``, the backbone's
    ``channels``) in line with the layers, after they were pruned or narrowed."""
    classifier = getattr(model, "classifier", None)
    decoder = getattr(model, "decoder", None)
    if isinstance(classifier, nn.Conv2d) and decoder is not None:
        decoder.out_channels = classifier.in_channels
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "channels"):
        side = max(getattr(backbone, "reductions", (32,)))
        param = next(backbone.parameters())
        training = backbone.training
        backbone.eval()  # a probe must not move BatchNorm statistics
        try:
            features = backbone(torch.zeros(1, 3, side, side, dtype=param.dtype, device=param.device))
        finally:
            backbone.train(training)
        backbone.channels = tuple(int(f.shape[1]) for f in features)

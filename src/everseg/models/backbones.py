"""Backbones: an image in, a list of feature maps at increasing strides out.

Every backbone has the same small interface, :class:`Backbone`:

- ``forward(x) -> list[Tensor]``: one feature map per stage, shallowest first;
- ``channels``: the channel count of each feature map;
- ``reductions``: how many input pixels each feature pixel spans (its stride),
  e.g. ``(2, 4, 8, 16, 32)``, or ``(2, 4, 8, 16, 16)`` at output stride 16;
- ``mean`` / ``std``: the input normalisation the pretrained weights expect
  (applied by :class:`~everseg.models.Segmenter`, not by the backbone).

Output strides below 32 replace the strides of the last stage(s) with dilation so
the deepest features keep more resolution while the pretrained weights still fit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from everseg.models.weights import (
    WeightsUnavailableError,
    check_compatible,
    is_reachable,
    map_in_order,
    read_state_dict,
    resolve_pretrained_weights,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # EfficientNet-Lite expects inputs in [-1, 1]

OUTPUT_STRIDES = (8, 16, 32)
_NOMINAL_REDUCTIONS = (2, 4, 8, 16, 32)

Pretrained = bool | str | os.PathLike[str]


class Backbone(nn.Module):
    """Common interface of all backbones (see the module docstring)."""

    channels: tuple[int, ...]
    reductions: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class StagedBackbone(Backbone):
    """A backbone cut into consecutive stages; the output of each stage is a feature map."""

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        channels: Sequence[int],
        reductions: Sequence[int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(channels)
        self.reductions = tuple(reductions)
        self.mean = mean
        self.std = std

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class TimmBackbone(Backbone):
    """A timm model created with ``features_only=True``."""

    def __init__(self, body: nn.Module, *, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.body = body
        info = body.feature_info  # type: ignore[attr-defined]
        self.channels = tuple(int(c) for c in info.channels())
        self.reductions = tuple(int(r) for r in info.reduction())
        self.mean = _triple(mean)
        self.std = _triple(std)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"expected 3 normalisation values (RGB), got {values}")
    return values  # type: ignore[return-value]


# ------------------------------------------------------------------ dilation


def _dilate(module: nn.Module, dilation: int) -> None:
    """Turn every stride-2 convolution in ``module`` into a stride-1 one and dilate its kernels."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            if layer.stride != (1, 1):
                layer.stride = (1, 1)
            kh, kw = layer.kernel_size
            if kh > 1 or kw > 1:
                layer.dilation = (dilation, dilation)
                layer.padding = ((kh - 1) // 2 * dilation, (kw - 1) // 2 * dilation)
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            raise ValueError(f"cannot dilate a stage that pools ({layer})")


def _apply_output_stride(stages: Sequence[nn.Module], output_stride: int) -> tuple[int, ...]:
    """Dilate the stages deeper than ``output_stride``; return the resulting reductions."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    for stage, nominal in zip(stages, _NOMINAL_REDUCTIONS, strict=True):
        if nominal > output_stride:
            _dilate(stage, nominal // output_stride)
    return tuple(min(r, output_stride) for r in _NOMINAL_REDUCTIONS)


# ------------------------------------------------------------ torchvision


def _load_torchvision(net: nn.Module, backbone: str, path: Path) -> None:
    state = read_state_dict(path)
    check_compatible(state, net.state_dict(), what=f"torchvision {backbone}", path=path)
    net.load_state_dict(state)


def _mobilenet_v2(output_stride: int, weights: Path | None) -> Backbone:
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2(weights=None)
    if weights is not None:
        _load_torchvision(net, "mobilenet_v2", weights)
    f = net.features
    # features[18] (the 1x1 conv to 1280 channels) only serves the classifier: dropped.
    stages = [f[0:2], f[2:4], f[4:7], f[7:14], f[14:18]]
    reductions = _apply_output_stride(stages, output_stride)
    return StagedBackbone(
        stages, channels=(16, 24, 32, 96, 320), reductions=reductions,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )


def _resnet(depth: int) -> Callable[[int, Path | None], Backbone]:
    def build(output_stride: int, weights: Path | None) -> Backbone:
        from torchvision import models

        net = getattr(models, f"resnet{depth}")(weights=None)
        if weights is not None:
            _load_torchvision(net, f"resnet{depth}", weights)
        stages = [
            nn.Sequential(net.conv1, net.bn1, net.relu),
            nn.Sequential(net.maxpool, net.layer1),
            net.layer2,
            net.layer3,
            net.layer4,
        ]
        reductions = _apply_output_stride(stages, output_stride)
        width = 4 if depth >= 50 else 1  # bottleneck blocks expand their output 4x
        channels = (64, 64 * width, 128 * width, 256 * width, 512 * width)
        return StagedBackbone(
            stages, channels=channels, reductions=reductions, mean=IMAGENET_MEAN, std=IMAGENET_STD
        )

    return build


# -------------------------------------------------------------------- timm


def _timm_features(name: str, output_stride: int, **kwargs: object) -> nn.Module:
    import timm

    extra = {} if output_stride == 32 else {"output_stride": output_stride}
    try:
        return timm.create_model(name, features_only=True, **extra, **kwargs)
    except (WeightsUnavailableError, FileNotFoundError):
        raise
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"timm has no model {name!r} (see timm.list_models())") from exc
        raise
    except (TypeError, AssertionError, NotImplementedError) as exc:
        if extra:  # timm models without dilation support fail in one of these ways
            raise ValueError(
                f"timm model {name!r} cannot be built with output_stride={output_stride} "
                f"({exc}); use output_stride=32 or another backbone"
            ) from exc
        raise


def _efficientnet_lite(variant: int) -> Callable[[int, Path | None], Backbone]:
    timm_name = f"tf_efficientnet_lite{variant}"

    def build(output_stride: int, weights: Path | None) -> Backbone:
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        body = _timm_features(timm_name, output_stride, pretrained=False)
        if weights is not None:
            _load_efficientnet_lite(body, timm_name, weights)
        return TimmBackbone(body, mean=HALF, std=HALF)

    return build


def _load_efficientnet_lite(body: nn.Module, timm_name: str, path: Path) -> None:
    """Load an EfficientNet-Lite classifier checkpoint into timm's feature extractor.

    Two layouts are accepted: timm's own parameter names, or the converted Google
    checkpoints (``_conv_stem``, ``_blocks.N...``) whose tensors come in the same
    order and shapes as timm's, so they are renamed by position.
    """
    import timm

    state = read_state_dict(path)
    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False).state_dict()
    what = f"{timm_name} (EfficientNet-Lite{timm_name[-1]})"
    if set(state) == set(reference):
        check_compatible(state, reference, what=what, path=path)
    else:
        state = map_in_order(state, reference, what=what, path=path)
    wanted = body.state_dict()
    body.load_state_dict({k: state[k] for k in wanted})


def _timm_generic(name: str, output_stride: int, pretrained: Pretrained) -> Backbone:
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    if pretrained is False:
        body = _timm_features(name, output_stride, pretrained=False)
    elif pretrained is True:
        body = _timm_pretrained(name, output_stride)
    else:
        path = resolve_pretrained_weights(f"timm:{name}", pretrained)
        try:
            body = _timm_features(
                name, output_stride, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
            )
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"cannot load {path} into timm model {name!r}: {exc}") from exc
    cfg = getattr(body, "pretrained_cfg", None) or {}
    backbone = TimmBackbone(
        body, mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD)
    )
    if output_stride != 32 and backbone.reductions[-1] != output_stride:
        raise ValueError(
            f"timm model {name!r} ignored output_stride={output_stride} (its deepest feature "
            f"is at stride {backbone.reductions[-1]}); use output_stride=32 or another backbone"
        )
    return backbone


def _timm_pretrained(name: str, output_stride: int) -> nn.Module:
    """timm's own pretrained weights, without its long retry loop when offline."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        _timm_features(name, output_stride, pretrained=False)  # raises the "unknown model" error
        raise WeightsUnavailableError(f"timm has no pretrained weights for {name!r}")
    cached = _timm_cached_file(cfg)
    try:
        if cached is not None:
            return _timm_features(
                name, output_stride, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}
            )
        source = "https://huggingface.co" if cfg.hf_hub_id else cfg.url
        if not source or not is_reachable(source):
            raise WeightsUnavailableError(
                f"timm's pretrained weights for {name!r} are not cached and cannot be "
                f"downloaded (offline?). Pass a weights file instead: "
                f"create_model(..., backbone='timm:{name}', pretrained='/path/to/file'), "
                "or pretrained=False."
            )
        return _timm_features(name, output_stride, pretrained=True)
    except (WeightsUnavailableError, ValueError):
        raise
    except Exception as exc:
        raise WeightsUnavailableError(
            f"timm could not load pretrained weights for {name!r}: {exc}"
        ) from exc


def _timm_cached_file(cfg: object) -> Path | None:
    """A copy of timm's weights already in the Hugging Face or torch hub cache, if any."""
    hf_id = getattr(cfg, "hf_hub_id", None)
    if hf_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, revision = hf_id.partition("@")
            for filename in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    url = getattr(cfg, "url", None)
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


# -------------------------------------------------------------------- dispatch

_BUILDERS: dict[str, Callable[[int, Path | None], Backbone]] = {
    "mobilenet_v2": _mobilenet_v2,
    "efficientnet_lite0": _efficientnet_lite(0),
    "efficientnet_lite1": _efficientnet_lite(1),
    "efficientnet_lite2": _efficientnet_lite(2),
    "resnet18": _resnet(18),
    "resnet50": _resnet(50),
}

BACKBONES: tuple[str, ...] = tuple(_BUILDERS)
"""Built-in backbone names; any ``"timm:<model name>"`` works as well."""


def check_backbone_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a built-in backbone or ``timm:<name>``."""
    if name in _BUILDERS:
        return
    if name.startswith("timm:") and len(name) > len("timm:"):
        return
    raise ValueError(
        f"unknown backbone {name!r}; choose one of {list(BACKBONES)} or 'timm:<timm model name>'"
    )


def build_backbone(name: str, *, output_stride: int = 32, pretrained: Pretrained = False) -> Backbone:
    """Build backbone ``name`` (see :data:`BACKBONES`, or ``"timm:<name>"``).

    ``pretrained``: True loads ImageNet weights (see
    :func:`~everseg.models.weights.resolve_pretrained_weights`), False leaves a random
    initialisation, a path loads that file.
    """
    check_backbone_name(name)
    if name.startswith("timm:"):
        return _timm_generic(name[len("timm:"):], output_stride, pretrained)
    if pretrained is False:
        weights = None
    elif pretrained is True:
        weights = resolve_pretrained_weights(name)
    else:
        weights = resolve_pretrained_weights(name, pretrained)
    if weights is not None:
        logger.info("loading %s weights from %s", name, weights)
    return _BUILDERS[name](output_stride, weights)

"""The segmentation model: backbone -> decoder -> dropout -> 1x1 classifier."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from everseg.data.labelspace import LabelSpace
from everseg.models.backbones import Backbone


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's architecture (weights are saved separately)."""

    arch: str  # decoder architecture, one of ARCHITECTURES
    backbone: str  # one of BACKBONES, or "timm:<timm model name>"
    num_classes: int  # output channels of the classifier
    output_stride: int = 16  # input size / size of the deepest features: 8, 16 or 32 (U-Net: always 32)
    dropout: float = 0.1  # dropout probability right before the classifier
    decoder_channels: int = 256  # decoder width; what it means per architecture: decoders.py
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # subtracted from [0, 1] RGB input
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # then divided by this
    pruned: float = 0.0  # share of channels structured pruning removed (0: the architecture's widths; else the saved weights set them)
    aspp_rates: tuple[int, ...] | None = None  # DeepLab ASPP dilation rates at output_stride; None = the paper's

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if self.aspp_rates is None:
            del d["aspp_rates"]  # models with the paper's rates keep the file older versions read
        else:
            d["aspp_rates"] = list(self.aspp_rates)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they hint at a newer format)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        missing = [n for n in ("arch", "backbone", "num_classes") if n not in d]
        if missing:
            raise ValueError(f"ModelConfig is missing fields: {missing}")
        values = dict(d)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        for key in ("num_classes", "output_stride", "decoder_channels"):
            if key in values:
                values[key] = int(values[key])
        for key in ("dropout", "pruned"):
            if key in values:
                values[key] = float(values[key])
        if values.get("aspp_rates") is not None:
            rates = values["aspp_rates"]
            if not isinstance(rates, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rates):
                raise ValueError(f"aspp_rates must be a list of ints, got {rates!r}")
            values["aspp_rates"] = tuple(rates)
        return cls(**values)


def _as_label_space(value: LabelSpace | int) -> LabelSpace:
    if isinstance(value, LabelSpace):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a LabelSpace or a positive number of classes, got {value!r}")
    return LabelSpace(names=tuple(f"class{i}" for i in range(value)))


class Segmenter(nn.Module):
    """Semantic segmentation model.

    ``forward`` takes RGB images as floats in [0, 1] (N x 3 x H x W, any H and W),
    normalises them with the backbone's ``mean``/``std`` and returns logits
    N x num_classes x H x W. Sides that are not a multiple of the deepest feature
    stride are padded with black at the bottom and right first (the logits of the
    padding are cut off), so the feature grid sits on the pixels as in training.
    Build one with :func:`~everseg.models.create_model`.

    Attributes:
        backbone: feature extractor (:class:`~everseg.models.backbones.Backbone`).
        decoder: turns the feature maps into one map with ``decoder.out_channels`` channels.
        classifier: the final 1x1 ``nn.Conv2d``, ``num_classes`` outputs.
        config: :class:`ModelConfig`.
        label_space: the classes the outputs stand for.
        metadata: free JSON-serialisable dict saved with the model (training info etc.).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        backbone: Backbone,
        decoder: nn.Module,
        config: ModelConfig,
        label_space: LabelSpace | None = None,
    ) -> None:
        super().__init__()
        label_space = _as_label_space(config.num_classes if label_space is None else label_space)
        if label_space.num_classes != config.num_classes:
            raise ValueError(
                f"label space has {label_space.num_classes} classes, config says {config.num_classes}"
            )
        self.backbone = backbone
        self.decoder = decoder
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = self._new_classifier(config.num_classes)
        self.config = config
        self.label_space = label_space
        self.metadata: dict[str, Any] = {}
        self._backbone_frozen = False
        self._input_multiple = max(backbone.reductions)
        # Not saved in the state dict: the config is the one place they are stored.
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ forward

    @overload
    def forward(self, x: torch.Tensor, return_features: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def forward(
        self, x: torch.Tensor, return_features: Literal[True]
    ) -> tuple[torch.Tensor, dict[str, Any]]: ...

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Logits for images ``x`` in [0, 1]; with ``return_features`` also the intermediate maps.

        The features are ``{"backbone": [feature maps, shallowest first], "decoder":
        decoder output before dropout and classifier, "logits": the logits at the decoder's
        resolution, before upsampling}``.
        """
        if not torch.jit.is_tracing():  # checks are static under tracing (ONNX export)
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"expected images of shape N x 3 x H x W, got {tuple(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"expected a float tensor with values in [0, 1], got {x.dtype}")
        height, width = x.shape[-2:]
        # A side that is not a multiple of the deepest stride makes every strided layer
        # round, and the feature grid drifts against the pixels: on CamVid's 360 x 480
        # test images (360 = 22.5 x 16) that cost 0.7 mIoU (61.6 -> 62.3 when padded).
        # Black padding at the bottom and right, cut off the logits, keeps the grid
        # where training (crops that are multiples of the stride) put it.
        stride = self._input_multiple
        pad_h, pad_w = (-height) % stride, (-width) % stride
        # Under tracing the sizes are traced values and the pad must stay in the graph
        # even when it is zero for the example input, or ONNX models break on other sizes.
        padded = torch.jit.is_tracing() or bool(pad_h or pad_w)
        if padded:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features = self.backbone((x - self.mean) / self.std)
        return self._head(features, x.shape[-2:], (height, width), padded, return_features)

    def head(self, backbone_features: list[torch.Tensor], size: tuple[int, int], return_features: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """What :meth:`forward` returns for images of ``size`` (h, w) whose backbone features are
        ``backbone_features`` (another model's ``features["backbone"]``, when both share the
        backbone's weights): the decoder and classifier only."""
        height, width = size
        stride = self._input_multiple
        padded_size = (height + (-height) % stride, width + (-width) % stride)
        return self._head(backbone_features, padded_size, (height, width), padded_size != (height, width),
                          return_features)

    def _head(self, features: list[torch.Tensor], padded_size: Any, size: tuple[int, int], padded: bool,
              return_features: bool) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        decoded = self.decoder(features)
        small = self.classifier(self.dropout(decoded))
        logits = F.interpolate(small, size=padded_size, mode="bilinear", align_corners=False)
        if padded:
            logits = logits[..., :size[0], :size[1]]
        if return_features:
            return logits, {"backbone": features, "decoder": decoded, "logits": small}
        return logits

    def same_backbone(self, other: "Segmenter") -> bool:
        """Whether ``other``'s backbone computes what this one's frozen backbone does, so that
        ``other.head`` may take this one's features: the same architecture, input normalisation,
        weights and BatchNorm statistics, both in eval mode (no batch statistics, no stochastic
        layers), this one frozen (its weights will not move)."""
        if not self.backbone_frozen or self.backbone.training or other.backbone.training:
            return False
        if (type(self.backbone) is not type(other.backbone) or self.config.backbone != other.config.backbone
                or self.config.mean != other.config.mean or self.config.std != other.config.std):
            return False
        mine, theirs = self.backbone.state_dict(), other.backbone.state_dict()
        return mine.keys() == theirs.keys() and all(
            mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k].to(mine[k].device)) for k in mine)

    # ----------------------------------------------------------------- classes

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def _new_classifier(self, num_classes: int) -> nn.Conv2d:
        classifier = nn.Conv2d(self.decoder.out_channels, num_classes, kernel_size=1)
        nn.init.normal_(classifier.weight, std=0.01)
        nn.init.zeros_(classifier.bias)
        return classifier

    def reset_classifier(self, label_space_or_num_classes: LabelSpace | int) -> None:
        """Replace the classifier with a freshly initialised one for a new class set."""
        label_space = _as_label_space(label_space_or_num_classes)
        old = self.classifier.weight
        classifier = self._new_classifier(label_space.num_classes).to(device=old.device, dtype=old.dtype)
        if old.is_contiguous(memory_format=torch.channels_last) and not old.is_contiguous():
            classifier = classifier.to(memory_format=torch.channels_last)
        self.classifier = classifier
        self.config = dataclasses.replace(self.config, num_classes=label_space.num_classes)
        self.label_space = label_space

    def grow_classifier(self, label_space: LabelSpace, *, init: str = "background") -> None:
        """Add the classes that ``label_space`` appends to the current ones, keeping the old weights.

        ``init="background"`` is MiB's initialisation (Cermelli et al., CVPR 2020, sec. 3.3):
        every new class starts as a copy of the background (class 0) classifier, and the
        background and new biases are lowered by log(1 + new classes), so that the new
        classes split what was the background probability and the probabilities of the
        other old classes do not change. ``init="random"`` draws the new weights like a
        fresh classifier (old logits are then unchanged, but the new classes take some
        probability from every class).
        """
        old_n = self.num_classes
        if tuple(label_space.names[:old_n]) != tuple(self.label_space.names):
            raise ValueError(f"the new label space must start with the current classes "
                             f"{list(self.label_space.names)}, got {list(label_space.names)}")
        n_new = label_space.num_classes - old_n
        if n_new <= 0:
            raise ValueError("grow_classifier needs at least one new class")
        if init not in ("background", "random"):
            raise ValueError(f"init must be 'background' or 'random', not {init!r}")
        old = self.classifier
        grown = self._new_classifier(label_space.num_classes).to(device=old.weight.device,
                                                                   dtype=old.weight.dtype)
        with torch.no_grad():
            grown.weight[:old_n] = old.weight
            grown.bias[:old_n] = old.bias
            if init == "background":
                shift = math.log(n_new + 1)
                grown.weight[old_n:] = old.weight[0]
                grown.bias[old_n:] = old.bias[0] - shift
                grown.bias[0] = old.bias[0] - shift
        if old.weight.is_contiguous(memory_format=torch.channels_last) and not old.weight.is_contiguous():
            grown = grown.to(memory_format=torch.channels_last)
        self.classifier = grown
        self.config = dataclasses.replace(self.config, num_classes=label_space.num_classes)
        self.label_space = label_space

    def set_label_space(self, label_space: LabelSpace) -> None:
        """Rename the classes (same count); use :meth:`reset_classifier` to change the count."""
        if label_space.num_classes != self.num_classes:
            raise ValueError(
                f"label space has {label_space.num_classes} classes but the classifier has "
                f"{self.num_classes}; use reset_classifier() to change the class count"
            )
        self.label_space = label_space

    # ---------------------------------------------------------------- training

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Decoder and classifier parameters."""
        return chain(self.decoder.parameters(), self.classifier.parameters())

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Stop (or restart) training the backbone.

        A frozen backbone has ``requires_grad=False`` and stays in eval mode across
        ``train()`` calls, so its BatchNorm statistics stay the pretrained ones (and
        stochastic layers such as drop-path are off).
        """
        self._backbone_frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.backbone.train(self.training and not frozen)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self._backbone_frozen:
            self.backbone.eval()
        return self

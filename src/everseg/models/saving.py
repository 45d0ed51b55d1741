"""Saving a model as a folder (``config.json`` + ``model.safetensors``) and loading it back.

``config.json`` holds::

    {"format": "everseg.model/1", "everseg_version": "...",
     "config": {ModelConfig fields}, "label_space": {LabelSpace fields},
     "metadata": {whatever model.metadata held}}

The folder alone rebuilds the model: no pretrained weights are needed to load it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from everseg.atomic import dir_mode, file_mode
from everseg.data.labelspace import LabelSpace
from everseg.models.factory import create_model
from everseg.models.segmenter import ModelConfig, Segmenter

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "everseg.model/1"


def _everseg_version() -> str:
    try:
        return importlib_metadata.version("everseg")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def save_model(model: Segmenter, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` to the folder ``directory`` atomically; return its path.

    Both files are written into a temporary folder beside ``directory`` which then
    replaces it, so readers see either the previous model or the new one, never a
    mix. An existing ``directory`` is replaced only if it holds nothing but a saved
    model and the replay memory stored with it (no other files get deleted).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise FileExistsError(f"cannot save a model to {directory}: it is a file")
        # The replay memory saved beside a model belongs to it and is replaced with it.
        others = sorted(p.name for p in directory.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE, "memory"))
        if others:
            raise FileExistsError(
                f"refusing to replace {directory}: it holds files other than a saved model "
                f"({others[:5]})"
            )
    payload = {
        "format": FORMAT,
        "everseg_version": _everseg_version(),
        "config": model.config.to_dict(),
        "label_space": model.label_space.to_dict(),
        "metadata": getattr(model, "metadata", None) or {},
    }
    try:
        text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model.metadata must be JSON-serialisable: {exc}") from exc
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}

    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".saving", dir=parent))
    try:
        os.chmod(staging, dir_mode())  # mkdtemp makes it 0700
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        os.chmod(staging / WEIGHTS_FILE, file_mode())  # safetensors writes 0600 whatever the umask
        with open(staging / CONFIG_FILE, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _replace_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``, replacing an existing folder there."""
    if not target.exists():
        os.replace(new, target)
        return
    retired = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(target, retired)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def read_model_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a saved model folder (errors name the file)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder not found: {directory}")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved everseg model: {CONFIG_FILE} is missing")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(payload, dict) or "config" not in payload or "label_space" not in payload:
        raise ValueError(f"{path} is not an everseg model config (no 'config'/'label_space')")
    return payload


def load_model(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Segmenter:
    """Rebuild the model saved in ``directory`` by :func:`save_model`; returned in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    payload = read_model_config(directory)
    config_path = directory / CONFIG_FILE
    try:
        config = ModelConfig.from_dict(payload["config"])
        label_space = LabelSpace.from_dict(payload["label_space"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"invalid model config in {config_path}: {exc}") from exc
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete saved model: {WEIGHTS_FILE} is missing")

    try:
        model = create_model(
            arch=config.arch,
            backbone=config.backbone,
            label_space=label_space,
            pretrained=False,
            output_stride=config.output_stride,
            dropout=config.dropout,
            decoder_channels=config.decoder_channels,
            aspp_rates=config.aspp_rates,
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot rebuild the model described in {config_path}: {exc}") from exc
    if model.config != config:  # normalisation stored with the model wins over the backbone's default
        model.config = config
        model.mean.copy_(torch.tensor(config.mean).view(1, 3, 1, 1))
        model.std.copy_(torch.tensor(config.std).view(1, 3, 1, 1))

    device = torch.device(map_location)
    try:
        state = load_file(str(weights_path), device=str(device))
    except Exception as exc:
        raise ValueError(f"cannot read model weights {weights_path}: {exc}") from exc
    try:
        if config.pruned:
            from everseg.models.widths import fit_widths_to_state

            fit_widths_to_state(model, state)
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{weights_path} does not fit the model described in {config_path}: {exc}") from exc
    model.metadata = dict(payload.get("metadata") or {})
    return model.to(device).eval()

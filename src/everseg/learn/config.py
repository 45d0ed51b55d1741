"""Training configuration: YAML files validated by pydantic, with dotted overrides.

Every field has a one-line comment; a value in a YAML file maps to the field of
the same name here, and from there to the code that reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Section):
    dataset: Literal["camvid", "folder", "voc", "cityscapes", "ade20k"] | None = None  # None = detect from layout
    path: str | None = None  # dataset root; the CLI's --data fills it
    train_split: str = "train"  # split to train on ("trainval" joins train+val where the reader allows)
    val_split: str | None = "val"  # split for validation/early stopping; None = no validation
    crop_size: tuple[int, int] | None = (320, 320)  # (h, w) training crop; None = whole images
    scale: tuple[float, float] = (0.5, 2.0)  # random rescale range
    base_size: tuple[int, int] | None = None  # (h, w) the scale range is relative to; None = each image's own size
    hflip: bool = True  # random horizontal flips
    rotation: float = 0.0  # max random rotation in degrees
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter strength
    cache: Literal["auto", "memory", "none"] = "auto"  # keep decoded images in RAM when they fit
    num_workers: int = 0  # DataLoader worker processes (0 = augment in the training process)


class ModelSection(_Section):
    arch: str = "deeplabv3plus"  # deeplabv3plus | deeplabv3 | lraspp | fcn | unet
    backbone: str = "mobilenet_v2"  # see everseg.models.BACKBONES, or "timm:<name>"
    pretrained: bool | str = True  # ImageNet weights (True), none (False) or a weights file
    output_stride: Literal[8, 16, 32] = 16  # backbone stride at the deepest feature map
    dropout: float = 0.1  # dropout before the classifier
    decoder_channels: int | None = None  # width of the decoder; None = the architecture's default
    init_from: str | None = None  # start from another everseg model folder (dataset-to-dataset transfer)


class OptimConfig(_Section):
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01  # peak learning rate of the head
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # applied to weights, not to norms and biases
    backbone_lr_factor: float = 1.0  # backbone LR = lr x this (discriminative learning rates)
    schedule: Literal["poly", "cosine", "constant"] = "poly"  # decay after warm-up, per step
    poly_power: float = 0.9  # exponent of the poly schedule
    warmup_epochs: float = 0.0  # linear warm-up length, in epochs
    min_lr_ratio: float = 0.0  # floor of the decayed LR as a fraction of the peak
    grad_clip: float | None = None  # clip the gradient norm to this


class LossConfig(_Section):
    kind: Literal["ce", "dice", "ce+dice"] = "ce"  # cross-entropy, soft Dice, or their sum
    class_weights: Literal["none", "median_frequency", "inverse_sqrt"] | list[float] = "none"  # CE class weights
    max_class_weight: float = 10.0  # clip computed class weights to avoid exploding rare-class losses
    dice_weight: float = 1.0  # weight of the Dice term in ce+dice
    label_smoothing: float = 0.0  # CE label smoothing


class TrainConfig(_Section):
    epochs: int = Field(30, ge=1)  # passes over the training set
    batch_size: int = Field(8, ge=1)  # images per forward pass
    grad_accum: int = Field(1, ge=1)  # forward passes per optimiser step
    seed: int = 0  # seeds python, numpy and torch
    finetune: Literal["full", "frozen", "gradual"] = "full"  # what of the backbone trains
    unfreeze_epochs: int = 3  # gradual: epochs between unfreezing successive backbone chunks
    unfreeze_chunks: int = 3  # gradual: how many chunks the backbone is unfrozen in
    early_stopping: int | None = None  # stop after this many validations without mIoU gain
    eval_every: int = 1  # validate every N epochs (and always after the last)
    max_minutes: float | None = None  # time budget: training stops when it is used (mid-epoch if need be); the LR decays by time
    channels_last: bool = True  # NHWC memory layout: faster convolutions on CPU
    bf16: Literal["auto", "on", "off"] = "auto"  # bfloat16 autocast; auto = when the CPU has native bf16
    threads: int | None = None  # torch intra-op threads; None = torch's default
    log_every: int = 10  # steps between progress/TensorBoard updates


class EvalConfig(_Section):
    mode: Literal["whole", "slide"] = "whole"  # inference on the whole image or sliding windows
    crop_size: tuple[int, int] | None = None  # sliding-window tile (h, w); default = training crop
    flip: bool = False  # horizontal-flip test-time augmentation
    scales: tuple[float, ...] = (1.0,)  # multi-scale test-time augmentation


class RunConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelSection = ModelSection()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("model")
    @classmethod
    def _known_arch(cls, v: ModelSection) -> ModelSection:
        from everseg.models import ARCHITECTURES

        if v.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {v.arch!r}; choose from {list(ARCHITECTURES)}")
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and field."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.02"`` -> ``("optim.lr", 0.02)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults), apply dotted ``overrides``, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from exc

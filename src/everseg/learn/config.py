"""Training configuration: YAML files validated by pydantic, with dotted overrides.

Every field has a one-line comment; a value in a YAML file maps to the field of
the same name here, and from there to the code that reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Numbers a config may hold: finite (a NaN learning rate trains an hour, then dies) and in range.
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]
# The deepest feature map of every backbone is 1/32 of the input: a smaller crop has no features.
MIN_CROP = 32
CropSide = Annotated[int, Field(ge=MIN_CROP)]

NO_SPLIT = ("none", "null", "")  # what --set data.val_split=... may say for "no validation"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Section):
    dataset: Literal["camvid", "folder", "voc", "cityscapes", "ade20k"] | None = None  # None = detect from layout
    path: str | None = None  # dataset root; the CLI's --data fills it
    train_split: str = "train"  # split to train on ("trainval" joins train and val, whichever exist)
    val_split: str | None = "val"  # split for validation/early stopping; None (or "none") = no validation
    val_fraction: Fraction = 0.1  # without a val split in the data: share of train held out for validation (0 = none)
    crop_size: tuple[CropSide, CropSide] | None = (320, 320)  # (h, w) training crop; None = whole images
    scale: tuple[Positive, Positive] = (0.5, 2.0)  # random rescale range
    base_size: tuple[PositiveInt, PositiveInt] | None = None  # (h, w) the scale range is relative to; None = each image's own size
    hflip: bool = True  # random horizontal flips
    rotation: Annotated[float, Field(ge=0, le=180, allow_inf_nan=False)] = 0.0  # max random rotation in degrees
    color_jitter: NonNegative = 0.0  # brightness/contrast/saturation jitter strength
    class_crops: Probability = 0.0  # share of training crops placed around a class drawn uniformly from the image's (favours small classes)
    cache: Literal["auto", "memory", "none"] = "auto"  # keep decoded images in RAM when they fit
    num_workers: Annotated[int, Field(ge=0)] = 0  # DataLoader worker processes (0 = augment in the training process)
    fit_to_data: bool = True  # crop, scale, batch, LR, warm-up and loss fields left unset follow the training images (everseg.data.fingerprint)

    @field_validator("val_split", mode="before")
    @classmethod
    def _no_split(cls, v: Any) -> Any:
        return None if v is None or (isinstance(v, str) and v.strip().lower() in NO_SPLIT) else v

    @field_validator("scale")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"the range's low end {v[0]} is above its high end {v[1]}")
        return v


class ModelSection(_Section):
    arch: str = "deeplabv3plus"  # deeplabv3plus | deeplabv3 | lraspp | fcn | unet
    backbone: str = "mobilenet_v2"  # see everseg.models.BACKBONES, or "timm:<name>"
    pretrained: bool | str = True  # ImageNet weights (True or "imagenet"), none (False) or a weights file
    output_stride: Literal[8, 16, 32] = 16  # backbone stride at the deepest feature map
    dropout: Fraction = 0.1  # dropout before the classifier
    decoder_channels: PositiveInt | None = None  # width of the decoder; None = the architecture's default
    # DeepLab ASPP dilation rates at output_stride; None = the paper's (6, 12, 18 at 16), made
    # for 513x513 crops: at 288x384 the widest one mostly reads padding in training. "auto"
    # scales the paper's to data.crop_size (everseg.models.decoders.aspp_rates_for_crop).
    aspp_rates: Literal["auto"] | list[PositiveInt] | None = None
    init_from: str | None = None  # start from another everseg model folder (dataset-to-dataset transfer)

    @field_validator("aspp_rates", mode="before")
    @classmethod
    def _rates_or_auto(cls, v: Any) -> Any:
        # Checked here so a bad value gets one message saying what is allowed, not one per
        # branch of the union ("should be 'auto'" for a list of rates with a zero in it).
        ok = v is None or v == "auto" or (
            isinstance(v, list) and v and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in v))
        if not ok:
            got = f", got {v!r}" if isinstance(v, (dict, list)) else ""  # the error's reader shows scalars itself
            raise ValueError(f"expected auto, null or a list of positive ints such as [3, 6, 9]{got}")
        return v


class OptimConfig(_Section):
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Positive = 0.01  # peak learning rate of the head
    momentum: Fraction = 0.9  # SGD momentum
    weight_decay: NonNegative = 1e-4  # applied to weights, not to norms and biases
    backbone_lr_factor: NonNegative = 1.0  # backbone LR = lr x this (discriminative learning rates)
    # Peak LR of an incremental step (everseg learn, scenario run's later steps) = lr x this.
    # 5 with the frozen backbone of train.incremental_finetune: a step has a tenth of the base's
    # time, and at the base's LR it barely learns the new classes (benchmarks/README.md, [step10-frozen]).
    incremental_lr_factor: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 5.0
    # Backbone LR of an incremental step = the step's LR x this, when train.incremental_finetune
    # trains the backbone; None: backbone_lr_factor, as in step 0. 0.05 with incremental_finetune
    # full learned new classes better than a frozen backbone in 6-minute steps with ce+dice, worse
    # in shorter ones and with the Lovász term (benchmarks/README.md, [4x-lovasz]).
    incremental_backbone_lr_factor: NonNegative | None = None
    schedule: Literal["poly", "cosine", "constant"] = "poly"  # decay after warm-up, per step
    poly_power: Positive = 0.9  # exponent of the poly schedule
    warmup_epochs: NonNegative = 0.0  # linear warm-up length, in epochs
    min_lr_ratio: Probability = 0.0  # floor of the decayed LR as a fraction of the peak
    grad_clip: Positive | None = None  # clip the gradient norm to this


class LossConfig(_Section):
    # cross-entropy, soft Dice, Lovász-softmax (a convex surrogate of 1 - IoU), or a sum of them
    kind: Literal["ce", "dice", "ce+dice", "lovasz", "ce+lovasz", "ce+dice+lovasz"] = "ce"
    class_weights: Literal["none", "median_frequency", "inverse_sqrt"] | list[NonNegative] = "none"  # CE class weights
    max_class_weight: Positive = 10.0  # clip computed class weights to avoid exploding rare-class losses
    dice_weight: NonNegative = 1.0  # weight of the Dice term in a sum
    lovasz_weight: NonNegative = 1.0  # weight of the Lovász term in a sum
    label_smoothing: Fraction = 0.0  # CE label smoothing
    # Weight of an auxiliary head's cross-entropy (deep supervision, learn/auxiliary.py), 0 = none.
    # Only while the backbone trains in a model's own training (not a later incremental step); the
    # head is dropped after training, so models, inference and export are unchanged.
    aux_weight: NonNegative = 0.0


class TrainConfig(_Section):
    epochs: int = Field(30, ge=1)  # passes over the training set
    batch_size: int = Field(8, ge=1)  # images per forward pass
    grad_accum: int = Field(1, ge=1)  # forward passes per optimiser step
    seed: Annotated[int, Field(ge=0)] = 0  # seeds python, numpy and torch
    finetune: Literal["full", "frozen", "gradual"] = "full"  # what of the backbone trains
    # ... in an incremental step (everseg learn, scenario run's later steps): frozen keeps the
    # features the old classes rest on, which lets the decoder learn new ones at a higher LR.
    incremental_finetune: Literal["full", "frozen", "gradual"] = "frozen"
    unfreeze_epochs: PositiveInt = 3  # gradual: epochs between unfreezing successive backbone chunks
    unfreeze_chunks: PositiveInt = 3  # gradual: how many chunks the backbone is unfrozen in
    early_stopping: PositiveInt | None = None  # stop after this many validations without mIoU gain
    eval_every: PositiveInt = 1  # validate every N epochs (and always after the last)
    max_minutes: Positive | None = None  # time budget: training stops when it is used (mid-epoch if need be); the LR decays by time
    channels_last: bool = True  # NHWC memory layout: faster convolutions on CPU
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps
    bf16: Literal["auto", "on", "off"] = "auto"  # mixed precision; auto = bf16 on CPUs with native bf16, on CUDA bf16 else fp16 + scaler
    threads: PositiveInt | None = None  # torch intra-op threads; None = torch's default
    log_every: PositiveInt = 10  # steps between progress/TensorBoard updates
    # Keep an exponential moving average of the weights with this decay (0 = off); the average is
    # what is validated, saved and returned. The decay ramps up to it as (1 + n) / (10 + n) after
    # n steps, so until 10 / (1 - decay) steps the average weighs about the last tenth of the run.
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        from everseg.devices import check_device_name

        return check_device_name(v)

    @field_validator("bf16", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML reads a bare on/off (as in --set train.bf16=off) as a boolean.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class EvalConfig(_Section):
    mode: Literal["whole", "slide"] = "whole"  # inference on the whole image or sliding windows
    crop_size: tuple[CropSide, CropSide] | None = None  # sliding-window tile (h, w); default = training crop
    flip: bool = False  # horizontal-flip test-time augmentation
    scales: tuple[Positive, ...] = Field((1.0,), min_length=1)  # multi-scale test-time augmentation


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
        from everseg.models.decoders import ASPP_ARCHITECTURES

        if v.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {v.arch!r}; choose from {list(ARCHITECTURES)}")
        if v.aspp_rates is not None and v.arch not in ASPP_ARCHITECTURES:
            raise ValueError(f"aspp_rates applies to {' and '.join(ASPP_ARCHITECTURES)}, not {v.arch!r}")
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and field."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, label: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{label}: {k!r} is not a section")
    node[keys[-1]] = value


def config_value(cfg: "RunConfig", dotted: str) -> Any:
    """The value of field ``section.name`` of ``cfg`` (None when there is no such field)."""
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return value


def is_set(cfg: "RunConfig", dotted: str) -> bool:
    """Whether the user gave field ``section.name`` (in the file or as an override), not its default."""
    section, name = dotted.split(".")
    return section in cfg.model_fields_set and name in getattr(cfg, section).model_fields_set


def with_values(cfg: "RunConfig", values: Mapping[str, Any]) -> "RunConfig":
    """``cfg`` with ``section.name`` fields replaced by already valid ``values`` (they count as set)."""
    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in values.items():
        section, name = dotted.split(".")
        sections.setdefault(section, {})[name] = value
    return cfg.model_copy(update={s: getattr(cfg, s).model_copy(update=v) for s, v in sections.items()})


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.02"`` -> ``("optim.lr", 0.02)``; the value is parsed as YAML."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key or "." not in key:
        raise ConfigError(f"--set {text!r}: expected section.field=value, e.g. optim.lr=0.02")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None


def _field_name(loc: tuple[Any, ...]) -> str:
    """``("data", "crop_size", 0)`` -> ``data.crop_size[0]``; pydantic's union branches left out."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        elif "[" in str(p) or str(p).startswith(("literal", "list", "tuple")):
            continue
        else:
            parts.append(str(p))
    return ".".join(parts)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None, *,
                labels: Mapping[str, str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults), apply dotted ``overrides``, validate.

    An invalid value is reported with where it came from: ``labels`` maps an override's key
    to how the user gave it (``{"optim.lr": "--set optim.lr=nan"}``); values from the file
    name the file.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file does not exist" if not path.exists()
                              else f"{path}: config is not a file")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (data:, model:, optim:, ...)")
    labels = dict(labels or {})
    for key, value in (overrides or {}).items():
        labels.setdefault(key, f"override {key}={value!r}")
        _set_dotted(tree, key, value, labels[key])
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        problems: dict[tuple[str, str], str] = {}  # one message per field (a union fails once per branch)
        for e in exc.errors():
            name = _field_name(e["loc"])
            origin = next((labels[k] for k in labels
                           if name == k or name.startswith((k + ".", k + "[")) or k.startswith(name + ".")), source)
            msg = e["msg"].removeprefix("Value error, ")
            given = e.get("input")
            if e["type"] == "extra_forbidden":
                section = _SECTIONS.get(name.split(".")[0]) if "." in name else RunConfig
                known = ", ".join(section.model_fields) if section is not None else ""
                msg, given = f"unknown field (known: {known})", None
            shown = "" if given is None or isinstance(given, (dict, list)) else f" (got {given!r})"
            problems.setdefault((origin, name), f"{origin}: {name}: {msg}{shown}")
        raise ConfigError("; ".join(problems.values())) from exc


_SECTIONS: dict[str, type[BaseModel]] = {"data": DataConfig, "model": ModelSection, "optim": OptimConfig,
                                         "loss": LossConfig, "train": TrainConfig, "eval": EvalConfig}

"""From a RunConfig to a trained model: build the data, the model and the plugins, then fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from everseg.data.dataset import SegmentationDataset
from everseg.data.fingerprint import Plan
from everseg.data.transforms import AugmentConfig, train_transform
from everseg.learn.config import RunConfig, is_set, with_values
from everseg.learn.finetune import FrozenBackbone, GradualUnfreeze
from everseg.learn.plugins import Plugin
from everseg.learn.rundir import claim_run_folder, clear_run_folder
from everseg.learn.trainer import FitResult, Trainer, seed_everything

log = logging.getLogger(__name__)


def training_augmentation(cfg: RunConfig):
    """The joint image+mask transform that ``cfg.data`` describes."""
    dc = cfg.data
    return train_transform(AugmentConfig(crop_size=dc.crop_size, scale=dc.scale, base_size=dc.base_size,
                                         hflip=dc.hflip, rotation=dc.rotation, color_jitter=dc.color_jitter,
                                         class_crops=dc.class_crops))


def build_datasets(cfg: RunConfig) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """The augmented training set and the validation set (None without validation).

    When the config asks for the default ``val`` split and the data has none (a folder
    dataset without ``val.txt``), ``data.val_fraction`` of the training images are held
    out for validation instead (the same ones for the same seed), and the log says so.
    """
    from everseg.data import open_dataset
    from everseg.data.open import available_splits, dataset_kind

    dc = cfg.data
    if dc.path is None:
        raise ValueError("no dataset path: set data.path in the config or pass --data")
    kind = dataset_kind(dc.path, dc.dataset)
    train = open_dataset(dc.path, dataset=kind, split=dc.train_split, cache=dc.cache)
    val = None
    if dc.val_split == "val" and "val" not in available_splits(dc.path, kind):
        train, val = _hold_out(train, dc.val_fraction, cfg.train.seed)
    elif dc.val_split:
        val = open_dataset(dc.path, dataset=kind, split=dc.val_split, cache=dc.cache)
    return train.with_transform(training_augmentation(cfg)), val


# Config fields a dataset's fingerprint may choose when the user leaves them unset.
FITTED_FIELDS = ("data.crop_size", "data.scale", "train.batch_size", "optim.lr", "optim.warmup_epochs", "loss.kind",
                 "loss.class_weights")


def fit_to_data(cfg: RunConfig, train_set: SegmentationDataset) -> tuple[RunConfig, Plan | None]:
    """``cfg`` with the crop, scale, batch, learning-rate and loss fields the user left unset (in the config file
    and ``--set``) chosen from the training images, as ``everseg.data.fingerprint`` explains;
    the config unchanged (and no plan) when every one is set or ``data.fit_to_data`` is off."""
    from everseg.data.fingerprint import fingerprint, plan_defaults

    unset = {f for f in FITTED_FIELDS if not is_set(cfg, f)}
    if not cfg.data.fit_to_data or not unset:
        return cfg, None
    fp = fingerprint(train_set)
    plan = plan_defaults(fp, unset, loss_kind=cfg.loss.kind, crop_size=cfg.data.crop_size,
                         batch_size=cfg.train.batch_size)
    plan.fingerprint = fp
    fitted = with_values(cfg, plan.values)
    absent = fp.absent_classes()
    log.info("fitted to %s (%d of its %d images measured): %s. Set a field to choose it yourself, or "
             "data.fit_to_data=false for the built-in defaults", train_set.name, fp.measured, fp.images,
             plan.describe())
    if absent:
        log.warning("%s: no pixels of %s in the measured training images", train_set.name, ", ".join(absent))
    return fitted, plan


def _write_plan(path: Path, plan: Plan) -> None:
    import json

    from everseg.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    chosen = {k: list(v) if isinstance(v, tuple) else v for k, v in plan.values.items()}
    atomic_write_text(path, json.dumps({"chosen": chosen, "reasons": plan.reasons,
                                        "fingerprint": plan.fingerprint.to_dict()}, indent=2) + "\n")


def _hold_out(data: SegmentationDataset, fraction: float, seed: int
              ) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    where = f"{data.name} has no 'val' split"
    count = round(fraction * len(data))
    if fraction == 0 or len(data) < 2 or count == 0:
        log.info("%s: training without validation (the last epoch's model is kept; data.val_fraction=%g "
                 "of %d images holds out none)", where, fraction, len(data))
        return data, None
    order = np.random.default_rng(seed).permutation(len(data))
    held, kept = sorted(order[:count].tolist()), sorted(order[count:].tolist())
    log.info("%s: holding out %d of its %d images for validation (data.val_fraction=%g; set "
             "data.val_split=none to train on all)", where, count, len(data), fraction)
    return data.subset(kept, name=f"{data.name} (training part)"), data.subset(held, name=f"{data.name} (held out)")


def build_model(cfg: RunConfig, train_set: SegmentationDataset) -> nn.Module:
    """A new model with a pretrained backbone, or an existing everseg model re-headed for this data."""
    from everseg.models import create_model, load_model

    mc = cfg.model
    if mc.init_from:
        model = load_model(mc.init_from)
        if tuple(model.label_space.names) != tuple(train_set.label_space.names):
            # Dataset-to-dataset transfer: keep backbone and decoder, new classifier for the new classes.
            model.reset_classifier(train_set.label_space)
        return model
    return create_model(arch=mc.arch, backbone=mc.backbone, label_space=train_set.label_space,
                        pretrained=mc.pretrained, output_stride=mc.output_stride, dropout=mc.dropout,
                        decoder_channels=mc.decoder_channels, aspp_rates=aspp_rates(cfg))


def aspp_rates(cfg: RunConfig) -> tuple[int, ...] | list[int] | None:
    """``model.aspp_rates`` with "auto" resolved against the training crop (fit to the data first)."""
    if cfg.model.aspp_rates == "auto":
        from everseg.models.decoders import aspp_rates_for_crop

        return aspp_rates_for_crop(cfg.data.crop_size, cfg.model.output_stride)
    return cfg.model.aspp_rates


def finetune_plugins(cfg: RunConfig) -> list[Plugin]:
    tc = cfg.train
    if tc.finetune == "frozen":
        return [FrozenBackbone()]
    if tc.finetune == "gradual":
        return [GradualUnfreeze(every=tc.unfreeze_epochs, chunks=tc.unfreeze_chunks)]
    return []


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, plugins: Sequence[Plugin] = (), model: nn.Module | None = None,
          protect: Sequence[str | Path] = ()) -> FitResult:
    """Train as ``cfg`` says, writing the run (config, checkpoint, model, TensorBoard) into ``out_dir``.

    A folder that already holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (replace it) says otherwise; a refused call writes nothing.
    ``model``: train this model instead of building one from ``cfg.model`` (a pruned model);
    ``protect``: paths the run folder must not contain (the models this run starts from).
    """
    from everseg.devices import resolve_device
    from everseg.learn import distributed

    resolve_device(cfg.train.device)  # a missing GPU is refused before anything is read or cleared
    world = distributed.init_from_environment(cfg.train.device)
    protect = [*protect, *([cfg.model.init_from] if cfg.model.init_from else [])]
    # Under torchrun process 0 alone judges and clears the folder: the others would see its files appear.
    clear = (claim_run_folder(out_dir, resume=resume, overwrite=overwrite, protect=protect)
             if world is None or world.main else False)
    train_set, val_set = build_datasets(cfg)
    cfg, plan = fit_to_data(cfg, train_set)
    if plan is not None:
        train_set = train_set.with_transform(training_augmentation(cfg))
    # Seeded before the model is built, or the decoder's initial weights differ from run to run
    # and so does the result (the Trainer seeds again for data order and augmentation).
    seed_everything(cfg.train.seed)
    if model is None:
        model = build_model(cfg, train_set)
    if clear:
        clear_run_folder(out_dir)
    # A resumed run keeps the record it began with (the same fit: the data has not changed, or the
    # Trainer refuses the resume since the config differs, and a refused command writes nothing).
    if plan is not None and not resume and (world is None or world.main):
        _write_plan(Path(out_dir) / "fingerprint.json", plan)
    distributed.barrier()
    trainer = Trainer(model, train_set, val_set, cfg, out_dir,
                      plugins=[*finetune_plugins(cfg), *plugins], progress=progress)
    try:
        return trainer.fit(resume=resume)
    finally:
        if world is not None:
            distributed.shutdown()

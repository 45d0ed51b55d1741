"""From a RunConfig to a trained model: build the data, the model and the plugins, then fit."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn

from everseg.data.dataset import SegmentationDataset
from everseg.data.transforms import AugmentConfig, train_transform
from everseg.learn.config import RunConfig
from everseg.learn.finetune import FrozenBackbone, GradualUnfreeze
from everseg.learn.plugins import Plugin
from everseg.learn.trainer import FitResult, Trainer, seed_everything


def training_augmentation(cfg: RunConfig):
    """The joint image+mask transform that ``cfg.data`` describes."""
    dc = cfg.data
    return train_transform(AugmentConfig(crop_size=dc.crop_size, scale=dc.scale, base_size=dc.base_size,
                                         hflip=dc.hflip, rotation=dc.rotation, color_jitter=dc.color_jitter))


def build_datasets(cfg: RunConfig) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    from everseg.data import open_dataset

    dc = cfg.data
    if dc.path is None:
        raise ValueError("no dataset path: set data.path in the config or pass --data")
    train = open_dataset(dc.path, dataset=dc.dataset, split=dc.train_split, cache=dc.cache)
    train = train.with_transform(training_augmentation(cfg))
    val = None
    if dc.val_split:
        val = open_dataset(dc.path, dataset=dc.dataset, split=dc.val_split, cache=dc.cache)
    return train, val


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
                        decoder_channels=mc.decoder_channels)


def finetune_plugins(cfg: RunConfig) -> list[Plugin]:
    tc = cfg.train
    if tc.finetune == "frozen":
        return [FrozenBackbone()]
    if tc.finetune == "gradual":
        return [GradualUnfreeze(every=tc.unfreeze_epochs, chunks=tc.unfreeze_chunks)]
    return []


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
          plugins: Sequence[Plugin] = ()) -> FitResult:
    """Train as ``cfg`` says, writing the run (config, checkpoint, model, TensorBoard) into ``out_dir``."""
    train_set, val_set = build_datasets(cfg)
    # Seeded before the model is built, or the decoder's initial weights differ from run to run
    # and so does the result (the Trainer seeds again for data order and augmentation).
    seed_everything(cfg.train.seed)
    model = build_model(cfg, train_set)
    trainer = Trainer(model, train_set, val_set, cfg, out_dir,
                      plugins=[*finetune_plugins(cfg), *plugins], progress=progress)
    return trainer.fit(resume=resume)

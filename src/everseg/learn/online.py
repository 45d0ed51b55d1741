"""Learning from single labelled images as they arrive, without disturbing predictions.

``OnlineLearner.observe(image, mask)`` trains a *copy* of the current model for a few
gradient steps on the new image mixed with replayed ones (the one Trainer loop, with the
replay strategy), checks the copy on a held-out set, and publishes it as a new version
only if its mIoU is not more than ``tolerance`` points below the current model's.
``predict`` always uses the current published model, swapped in under a lock.
"""

from __future__ import annotations

import copy
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from everseg.data.dataset import SegmentationDataset
from everseg.data.transforms import AugmentConfig, train_transform
from everseg.learn.config import load_config
from everseg.learn.memory import ReplayMemory
from everseg.learn.plugins import Plugin
from everseg.learn.strategies.base import ContinualContext
from everseg.learn.strategies.replay import Replay
from everseg.learn.trainer import Trainer, cpu_has_native_bf16
from everseg.models.registry import ModelRegistry


class _FrozenNorm(Plugin):
    """Keeps normalisation statistics fixed: a batch of one new image would skew them."""

    def on_epoch_start(self, trainer) -> None:
        for m in trainer.model.modules():
            if isinstance(m, _NormBase):
                m.eval()


@dataclass
class Observation:
    accepted: bool
    version: int  # the current version after this observation
    holdout_miou_before: float
    holdout_miou_after: float
    seconds: float


class OnlineLearner:
    """Absorbs labelled images one at a time; every accepted update is a new model version.

    Args:
        model: the starting model (published as version 1 if the registry is empty).
        registry: where versions are stored (a folder or a ModelRegistry).
        holdout: labelled images the guardrail scores every update on.
        memory: replay memory (a new class-balanced one of ``memory_size`` if None).
        steps: gradient steps per observed image.
        replay: replayed images per step.
        lr: learning rate of the updates (SGD with momentum).
        tolerance: largest holdout mIoU drop (points, 0-100) an update may cause and be published.
        crop_size: training crop (h, w); None = whole images.
    """

    def __init__(self, model: nn.Module, registry: str | Path | ModelRegistry, holdout: SegmentationDataset, *,
                 memory: ReplayMemory | None = None, memory_size: int = 20, steps: int = 4, replay: int = 3,
                 lr: float = 0.002, tolerance: float = 1.0, crop_size: tuple[int, int] | None = None, seed: int = 0):
        self.registry = registry if isinstance(registry, ModelRegistry) else ModelRegistry(registry)
        self.holdout = holdout
        self.memory = memory if memory is not None else ReplayMemory(memory_size, policy="reservoir", seed=seed)
        self.steps, self.replay, self.tolerance = steps, replay, tolerance
        self.bf16 = cpu_has_native_bf16()
        self._lock = threading.Lock()
        self._seen = 0
        self.config = load_config(None, {
            "train.epochs": steps, "train.batch_size": 1, "train.seed": seed, "train.log_every": 10**9,
            "optim.lr": lr, "optim.schedule": "constant", "optim.weight_decay": 0.0, "data.val_split": None,
            "data.crop_size": list(crop_size) if crop_size else None, "data.scale": [0.9, 1.1]})
        self.augment = train_transform(AugmentConfig(crop_size=crop_size, scale=(0.9, 1.1)))
        if self.registry.current is None:
            self.registry.publish(model, info={"source": "initial"})
            self._model = model.eval()
        else:
            self._model = self.registry.load().eval()
        self._holdout_miou = self._score(self._model)

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def version(self) -> int:
        return self.registry.current

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class ids (H x W) for an RGB uint8 image, from the current published model."""
        from everseg.evaluate import predict

        with self._lock:
            model = self._model
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        return predict(model, x, autocast_bf16=self.bf16)[0].numpy()

    def _score(self, model: nn.Module) -> float:
        from everseg.evaluate import evaluate

        return 100.0 * evaluate(model, self.holdout, autocast_bf16=self.bf16, progress=False).metrics.miou

    def observe(self, image: np.ndarray, mask: np.ndarray, stem: str | None = None) -> Observation:
        """Train a copy on this image (+ replay); publish it if the holdout guardrail allows."""
        start = time.perf_counter()
        self._seen += 1
        stem = stem or f"online-{self._seen}"
        with self._lock:
            base, parent = self._model, self.registry.current
        data = SegmentationDataset.from_arrays([image], [mask], base.label_space, [stem], name="online")
        candidate = copy.deepcopy(base)
        ctx = ContinualContext(step=None, step_index=self._seen, old_model=None, old_num_classes=base.num_classes,
                               memory=self.memory)
        replay = Replay(fraction=float(self.replay), seed=self._seen)
        replay.begin_step(ctx)
        torch.manual_seed(self._seen)
        with tempfile.TemporaryDirectory() as tmp:
            Trainer(candidate, data.with_transform(self.augment), None, self.config, tmp,
                    plugins=[_FrozenNorm(), replay], progress=False, write_run=False).fit()
        candidate.eval()
        after = self._score(candidate)
        before = self._holdout_miou
        accepted = after >= before - self.tolerance
        if accepted:
            version = self.registry.publish(candidate, parent=parent,
                                            info={"observed": stem, "holdout_miou": after, "previous": before})
            with self._lock:
                self._model, self._holdout_miou = candidate, after
        else:
            version = parent
        self._remember(image, mask, stem)
        return Observation(accepted, version, before, after, time.perf_counter() - start)

    def _remember(self, image: np.ndarray, mask: np.ndarray, stem: str) -> None:
        one = SegmentationDataset.from_arrays([image], [mask], self._model.label_space, [stem], name="online")
        self.memory.update(one, step=self._seen)

    def rollback(self, version: int | None = None) -> int:
        """Serve an earlier version again (default: the current one's parent)."""
        with self._lock:
            version = self.registry.rollback(version)
            self._model = self.registry.load(version).eval()
            self._holdout_miou = self._score(self._model)
            return version

"""Learning from single labelled images as they arrive, without disturbing predictions.

``OnlineLearner.observe(image, mask)`` trains a *copy* of the current model for a few
gradient steps on the new image mixed with replayed ones (the one Trainer loop, with the
replay strategy), checks the copy on a held-out set, and publishes it as a new version
only if its mIoU is not more than ``tolerance`` points below the current model's.
``predict`` always uses the current published model, swapped in under a lock.

Three things keep single-image updates from doing harm:

- the update's cross-entropy is class-weighted by what it trains on (the memory plus the new
  image), so one image dominated by road and sky does not push the rare classes away;
- the replay memory can start with the images the model already learned from (pass
  ``ReplayMemory.load(model_dir / "memory")`` or one filled from the training set), so each
  update rehearses the old conditions instead of only the stream;
- with ``holdout_every=k`` every k-th observed image joins the held-out set instead of being
  trained on, so the guardrail also scores the conditions the stream brings, not only the
  ones the initial held-out set was drawn from.

Each published version stores the memory it was trained with, and a learner restarted on the
same registry takes it back. With ``keep_rejected`` a candidate the guardrail refuses is kept in
the registry too (never active), with the reason. Several processes may share the registry (the
server's update worker beside an operator's ``everseg models rollback``): :meth:`follow` takes up
whatever version is active now.

New classes arrive with :meth:`learn_new_classes`: a few images whose masks name them, taught
together (the classifier grows, replay rehearses the old classes), under the same guardrail.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from everseg.data.dataset import SegmentationDataset
from everseg.data.io import check_labelled_pair
from everseg.data.scenarios import align_to_model, has_background
from everseg.devices import choose_precision, resolve_device
from everseg.evaluate.metrics import SegmentationMetrics
from everseg.learn.config import DataConfig, OptimConfig, RunConfig, TrainConfig
from everseg.learn.losses import compute_class_weights
from everseg.learn.memory import ReplayMemory
from everseg.learn.plugins import Plugin
from everseg.learn.run import finetune_plugins, training_augmentation
from everseg.learn.strategies.base import ContinualContext
from everseg.learn.strategies.replay import Replay
from everseg.learn.trainer import Trainer
from everseg.models.versions import ModelRegistry


class _FrozenNorm(Plugin):
    """Keeps normalisation statistics fixed: a batch of one new image would skew them.

    ``dropout_off`` also turns dropout off, which frozen updates do: drawing the dropout mask
    of a full-size decoder map took 0.15 s of each 1 s step, and without it as many corrections
    were accepted (benchmarks/online_fresh.py: 12 of 20, against 10 with it at 14b8552). Full
    updates keep it: at 45da0a3, which ran them without it, they accepted 5 of 20 corrections
    instead of 14 (40.6 -> 48.8 mIoU, not 50.3).
    """

    def __init__(self, dropout_off: bool = False):
        self.dropout_off = dropout_off

    def on_epoch_start(self, trainer) -> None:
        kinds = (_NormBase, nn.Dropout, nn.Dropout2d) if self.dropout_off else _NormBase
        for m in trainer.model.modules():
            if isinstance(m, kinds):
                m.eval()


class FeatureCache:
    """Backbone features of single images, least recently used dropped past ``max_bytes``.

    The held-out images are looked up at every update and so stay; a training image's mirror
    that no later update replays is what goes first.
    """

    def __init__(self, max_bytes: int = 2**30):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> list[torch.Tensor] | None:
        features = self._items.get(key)
        if features is not None:
            self._items.move_to_end(key)
        return features

    def put(self, key: tuple, features: list[torch.Tensor]) -> None:
        size = sum(f.numel() * f.element_size() for f in features)
        if key in self._items or size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= sum(f.numel() * f.element_size() for f in dropped)
        self._items[key] = features
        self.bytes += size


class _ReusedBackbone(nn.Module):
    """Stands in for a frozen backbone: the features of an input image this backbone has seen
    are taken from ``cache`` instead of computed again, image by image within a batch.

    With ``finetune="frozen"`` every candidate has its parent's backbone, so the held-out
    images, the replayed ones and the new image (whole, or mirrored: the only augmentation of
    frozen updates) have the same features for all of them, and only the decoder runs and
    trains. ``cache`` belongs to one backbone state (the learner keys it by a digest of the
    weights and statistics), so a reused feature map is what the backbone computes for that
    image (up to the last bits of float rounding between batch sizes).
    """

    def __init__(self, backbone: nn.Module, cache: FeatureCache):
        super().__init__()
        self.inner = backbone
        self.cache = cache

    def forward(self, x: torch.Tensor):
        # Only a backbone that is a fixed function (nothing trains, statistics frozen) is reused,
        # whether or not the decoder after it is being trained.
        if self.inner.training or any(p.requires_grad for p in self.inner.parameters()):
            return self.inner(x)
        tag = (tuple(x.shape[1:]), str(x.dtype), torch.is_autocast_enabled("cpu"))
        keys = [(*tag, hashlib.blake2b(x[i].detach().contiguous().cpu().numpy().tobytes(), digest_size=16).digest())
                for i in range(x.shape[0])]
        found = [self.cache.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            computed = self.inner(x if len(missing) == x.shape[0] else x[missing])
            for j, i in enumerate(missing):
                # Cloned: a slice would keep the whole batch's maps alive.
                found[i] = [f[j:j + 1].detach().clone() for f in computed]
                self.cache.put(keys[i], found[i])
            if len(missing) == x.shape[0]:
                return computed
        return [torch.cat(level) for level in zip(*found)]


def _backbone_digest(model: nn.Module) -> bytes:
    """A digest of the backbone's weights and statistics: equal digests, equal features."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.backbone.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.digest()


@dataclass
class Observation:
    accepted: bool
    version: int  # the current version after this observation
    holdout_miou_before: float
    holdout_miou_after: float | None  # None when the update diverged (nothing to score)
    seconds: float
    held_out: bool = False  # the image joined the held-out set; nothing was trained
    reason: str | None = None  # why a candidate was rejected
    diverged: bool = False  # the update's loss stopped being finite; nothing was scored or kept
    timings: dict[str, float] = field(default_factory=dict)  # seconds: train, holdout, publish


class OnlineLearner:
    """Absorbs labelled images one at a time; every accepted update is a new model version.

    Args:
        model: the starting model (published as version 1 if the registry is empty).
        registry: where versions are stored (a folder or a ModelRegistry).
        holdout: labelled images the guardrail scores every update on.
        memory: replay memory; if None, the current version's stored memory when the registry
            has one, else a new reservoir memory of ``memory_size`` images.
        steps: gradient steps per observed image.
        replay: replayed images per step.
        lr: learning rate of the updates (SGD with momentum). Small, since each step sees one
            new image plus ``replay`` old ones through frozen normalisation: on the demo model
            (``benchmarks/online_fresh.py``) 0.0005 and 0.002 accept as many of 20 corrections,
            and 0.0005's worst candidate scores 38 mIoU where 0.002's scores 28. None takes 0.0005,
            or 0.01 with ``finetune="frozen"``: only the decoder and classifier move, and at 0.0005
            they hardly did (40.6 -> 44.5 after 20 corrections; 0.01 reached 51.0 after 10).
        tolerance: largest holdout mIoU drop (points, 0-100) an update may cause and be published.
        crop_size: training crop (h, w); None = whole images.
        class_weights: ``inverse_sqrt``, ``median_frequency`` or ``none``: CE class weights of
            each update, from the pixel counts of the memory plus the new image.
        holdout_every: every k-th observed image is held out (scored by the guardrail from
            then on, never trained on); None = the held-out set stays as given.
        keep_rejected: keep refused candidates in the registry (status "rejected", with the reason).
        publish_info: added to the info of every version this learner publishes.
        finetune: ``full`` or ``frozen`` (only the decoder and classifier learn; faster updates).
        device: where updates train and the learner's model runs (``auto``: CUDA when present);
            ``model`` is moved there.

    Holdout mIoU is over the holdout's own classes: a model with more (a background class, new
    classes) is scored on the data's classes, relabelled by name.
    """

    # Backbone features kept for frozen updates: MobileNetV2's five maps of a 360x480 image take
    # 5.4 MB, so this holds about 190 images (holdout, memory and mirrors).
    feature_cache_bytes = 2**30

    def __init__(self, model: nn.Module, registry: str | Path | ModelRegistry, holdout: SegmentationDataset, *,
                 memory: ReplayMemory | None = None, memory_size: int = 20, steps: int = 4, replay: int = 3,
                 lr: float | None = None, tolerance: float = 1.0, crop_size: tuple[int, int] | None = None, seed: int = 0,
                 class_weights: str = "inverse_sqrt", holdout_every: int | None = None,
                 keep_rejected: bool = False, publish_info: dict | None = None, finetune: str = "full",
                 device: str = "auto"):
        if holdout_every is not None and holdout_every < 2:
            raise ValueError(f"holdout_every must be at least 2 (every image held out trains nothing), "
                             f"got {holdout_every}")
        self.device = resolve_device(device, option="device")
        model = model.to(self.device)
        self.registry = registry if isinstance(registry, ModelRegistry) else ModelRegistry(registry)
        self.holdout, self._scored = align_to_model(holdout, model.label_space)
        self.holdout_every = holdout_every
        self.keep_rejected = keep_rejected
        self.publish_info = dict(publish_info or {})
        self._held_out: list[tuple[np.ndarray, np.ndarray, str]] = []
        # Held-out features of one backbone state, reused while candidates keep that backbone.
        self._features: tuple[bytes | None, FeatureCache] = (None, FeatureCache(self.feature_cache_bytes))
        self.class_weights = class_weights
        compute_class_weights(np.ones((1, 2)), class_weights)  # refuses an unknown method now, not mid-stream
        if memory is None and self.registry.current is not None:
            stored = self.registry.path(self.registry.current) / "memory"
            memory = ReplayMemory.load(stored) if (stored / "memory.json").is_file() else None
        self.memory = memory if memory is not None else ReplayMemory(memory_size, policy="reservoir", seed=seed)
        self.steps, self.replay, self.tolerance = steps, replay, tolerance
        self.bf16 = choose_precision(self.device).dtype == torch.bfloat16
        self._lock = threading.Lock()
        self._seen = 0
        # Frozen updates mirror images but do not rescale them: the backbone's features of each
        # image and of its mirror are then computed once and reused by every later update
        # (replayed or held out), and only the decoder runs.
        scale = (1.0, 1.0) if finetune == "frozen" else (0.9, 1.1)
        self.config = RunConfig(
            data=DataConfig(val_split=None, crop_size=crop_size, scale=scale),
            optim=OptimConfig(lr=lr if lr is not None else (0.01 if finetune == "frozen" else 0.0005),
                              schedule="constant", weight_decay=0.0),
            train=TrainConfig(epochs=steps, batch_size=1, seed=seed, log_every=10**9, finetune=finetune,
                              device=str(self.device)))
        self.augment = training_augmentation(self.config)
        if self.registry.current is None:
            self._model = model.eval()
            self._confusion = self._holdout_confusion(self._model)
            self._version = self._publish(model, parent=None, info={"source": "initial"})
        else:
            self._version = self.registry.current
            self._model = self.registry.load(self._version, map_location=self.device).eval()
            self._confusion = self._holdout_confusion(self._model)

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def version(self) -> int:
        """The version this learner serves and trains from."""
        return self._version

    def follow(self) -> bool:
        """Take up the registry's active version if another process changed it; True if so."""
        current = self.registry.current
        if current is None or current == self._version:
            return False
        model = self.registry.load(current, map_location=self.device).eval()
        confusion = self._holdout_confusion(model)
        with self._lock:
            self._model, self._confusion, self._version = model, confusion, current
        return True

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class ids (H x W) for an RGB uint8 image, from the current published model."""
        from everseg.evaluate import predict

        with self._lock:
            model = self._model
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        return predict(model, x, autocast_bf16=self.bf16)[0].cpu().numpy()

    @property
    def holdout_miou(self) -> float:
        """The current model's mIoU on the held-out set (given + held out from the stream)."""
        return self._miou(self._confusion)

    def _miou(self, confusion: np.ndarray) -> float:
        return SegmentationMetrics.from_confusion(confusion, self._scored).miou

    def _held_out_set(self, items) -> SegmentationDataset:
        images, masks, stems = zip(*items)
        return SegmentationDataset.from_arrays(list(images), list(masks), self._model.label_space, list(stems),
                                               name="held-out")

    def _holdout_confusion(self, model: nn.Module, items=None) -> np.ndarray:
        """Summed confusion over the given held-out set and ``items`` (default: every held-out image)."""
        from everseg.evaluate import evaluate

        sets = [self.holdout] if items is None else []
        items = self._held_out if items is None else items
        if items:
            sets.append(self._held_out_set(items))
        def score() -> np.ndarray:
            return sum(evaluate(model, d, autocast_bf16=self.bf16, progress=False).metrics.confusion for d in sets)

        # The served model is never wrapped: prediction threads are using it.
        if model is self._model:
            return score()
        with self._reusing_backbone(model):
            return score()

    @contextmanager
    def _reusing_backbone(self, model: nn.Module):
        """While inside, ``model``'s backbone takes the features it has computed before from the
        cache of its weights, when updates keep the backbone frozen (only then do candidates share it)."""
        if self.config.train.finetune != "frozen":
            yield
            return
        digest = _backbone_digest(model)
        if digest != self._features[0]:
            self._features = (digest, FeatureCache(self.feature_cache_bytes))
        backbone = model.backbone
        model.backbone = _ReusedBackbone(backbone, self._features[1])
        try:
            yield
        finally:
            model.backbone = backbone

    def _publish(self, model: nn.Module, parent: int | None, info: dict, *, rejected: str | None = None) -> int:
        """Publish (or keep, rejected) a version with its memory, which a restarted learner replays."""
        info = {**self.publish_info, **info, "holdout_miou": info.get("holdout_miou", self.holdout_miou),
                "classes": list(model.label_space.names)}
        if rejected is not None:
            return self.registry.publish(model, parent=parent, info=info, status="rejected", reason=rejected)
        return self.registry.publish(model, parent=parent, info=info,
                                     save_extra=lambda folder: self.memory.save(folder / "memory"))

    def _update_config(self, mask: np.ndarray):
        """The update's config: class weights from what it trains on (memory + the new image)."""
        if self.class_weights == "none":
            return self.config
        n, ignore = self._model.num_classes, self._model.label_space.ignore_index
        counts = np.concatenate([np.bincount(mask[mask != ignore].ravel(), minlength=n)[None, :n],
                                 self.memory.pixel_counts(n, ignore)])
        weights = compute_class_weights(counts, self.class_weights, self.config.loss.max_class_weight)
        loss = self.config.loss.model_copy(update={"class_weights": weights.tolist()})
        return self.config.model_copy(update={"loss": loss})

    def observe(self, image: np.ndarray, mask: np.ndarray, stem: str | None = None,
                info: dict | None = None) -> Observation:
        """Train a copy on this image (+ replay); publish it if the holdout guardrail allows.

        ``image``: RGB uint8 ``H x W x 3``; ``mask``: ``H x W`` class ids of the model's label
        space, 255 = unlabelled. With ``holdout_every`` set, every k-th image is instead added
        to the held-out set. ``info`` goes into the published version's info.
        """
        ls = self._model.label_space
        check_labelled_pair(image, mask, ls.num_classes, ls.ignore_index, what=stem or "observed image")
        mask = np.asarray(mask).astype(np.uint8)
        start = time.perf_counter()
        self._seen += 1
        stem = stem or f"online-{self._seen}"
        with self._lock:
            base, parent = self._model, self._version
        data = SegmentationDataset.from_arrays([image], [mask], base.label_space, [stem], name="online")
        if self.holdout_every and self._seen % self.holdout_every == 0:
            before = self.holdout_miou
            item = (*data.decoded(0), stem)
            self._held_out.append(item)
            self._confusion = self._confusion + self._holdout_confusion(base, [item])
            return Observation(False, parent, before, self.holdout_miou, time.perf_counter() - start, held_out=True)
        candidate = copy.deepcopy(base)
        diverged = self._train(candidate, data, self._update_config(mask), base.num_classes, parent, start)
        if diverged is not None:
            return diverged
        candidate.eval()
        return self._guard(candidate, parent, info={"observed": stem, **(info or {})}, start=start,
                           remember=lambda: self._remember(image, mask, stem),
                           timings={"train": time.perf_counter() - start})

    def _train(self, candidate: nn.Module, data: SegmentationDataset, config, old_num_classes: int, parent: int,
               start: float) -> Observation | None:
        """Train ``candidate`` on ``data`` with replay from the memory, through the one Trainer
        loop. A diverged update (non-finite loss) comes back as a refused Observation, like one
        the guardrail rejects, so the service goes on: one bad image must not stop the loop."""
        ctx = ContinualContext(step=None, step_index=self._seen, old_model=None, old_num_classes=old_num_classes)
        replay = Replay(fraction=float(self.replay), seed=self._seen)
        replay.memory = self.memory  # the learner's own: it stores each observed image itself (_remember)
        replay.begin_step(ctx)
        torch.manual_seed(self._seen)
        try:
            with tempfile.TemporaryDirectory() as tmp, self._reusing_backbone(candidate):
                Trainer(candidate, data.with_transform(self.augment), None, config, tmp,
                        plugins=[*finetune_plugins(self.config),
                                 _FrozenNorm(dropout_off=self.config.train.finetune == "frozen"), replay], progress=False,
                        write_run=False).fit()
        except FloatingPointError as exc:
            before = self.holdout_miou
            seconds = time.perf_counter() - start
            return Observation(False, parent, before, None, seconds, diverged=True,
                               reason=f"the update diverged: {str(exc).split(':', 1)[-1].split(';')[0].strip()}",
                               timings={"train": seconds})
        return None

    def _guard(self, candidate: nn.Module, parent: int, *, info: dict, start: float,
               remember=None, timings: dict[str, float] | None = None) -> Observation:
        """Score ``candidate`` on the holdout; publish it within the tolerance, else keep it as
        rejected (``keep_rejected``). ``remember`` updates the memory before it is saved."""
        timings = dict(timings or {})
        scoring = time.perf_counter()
        confusion = self._holdout_confusion(candidate)
        timings["holdout"] = time.perf_counter() - scoring
        publishing = time.perf_counter()
        before, after = self.holdout_miou, self._miou(confusion)
        accepted = after >= before - self.tolerance
        if remember is not None:
            remember()
        info = {**info, "holdout_miou": after, "previous": before}
        reason = None
        if accepted:
            version = self._publish(candidate, parent=parent, info=info)
            with self._lock:
                self._model, self._confusion, self._version = candidate, confusion, version
        else:
            reason = (f"holdout mIoU {after:.2f} is more than the tolerance of {self.tolerance:g} below "
                      f"version {parent}'s {before:.2f}")
            version = self._publish(candidate, parent=parent, info=info, rejected=reason) if self.keep_rejected \
                else parent
        timings["publish"] = time.perf_counter() - publishing
        return Observation(accepted, version, before, after, time.perf_counter() - start, reason=reason,
                           timings=timings)

    def learn_new_classes(self, images: list[np.ndarray], masks: list[np.ndarray], names: list[str], *,
                          minutes: float = 2.0, epochs: int = 30, info: dict | None = None) -> Observation:
        """Teach the classes ``names`` from ``images`` whose masks use the grown label space (the
        current classes, then ``names``), rehearsing the old classes from the memory; guarded
        and published like :meth:`observe`. Training runs ``epochs`` passes over the images or
        ``minutes``, whichever ends first."""
        start = time.perf_counter()
        with self._lock:
            base, parent = self._model, self._version
        grown = base.label_space.extend(list(names))
        for i, (image, mask) in enumerate(zip(images, masks)):
            check_labelled_pair(image, mask, grown.num_classes, grown.ignore_index, what=f"new-class example {i}")
        stems = [f"new-{'-'.join(names)}-{self._seen + i + 1}" for i in range(len(images))]
        self._seen += len(images)
        data = SegmentationDataset.from_arrays(list(images), [np.asarray(m).astype(np.uint8) for m in masks],
                                               grown, stems, name="new classes")
        candidate = copy.deepcopy(base)
        # MiB's initialisation where a background class exists: new classes start as background.
        candidate.grow_classifier(grown, init="background" if has_background(base.label_space) else "random")
        cfg = self.config.model_copy(update={"train": self.config.train.model_copy(
            update={"epochs": epochs, "max_minutes": minutes})})
        diverged = self._train(candidate, data, cfg, base.num_classes, parent, start)
        if diverged is not None:
            return diverged
        candidate.eval()
        # The holdout's classes keep their ids in the grown space, so the scores compare.
        return self._guard(candidate, parent, info={"new_classes": list(names), **(info or {})}, start=start,
                           remember=lambda: self.memory.update(data, step=self._seen),
                           timings={"train": time.perf_counter() - start})

    def _remember(self, image: np.ndarray, mask: np.ndarray, stem: str) -> None:
        one = SegmentationDataset.from_arrays([image], [mask], self._model.label_space, [stem], name="online")
        self.memory.update(one, step=self._seen)

    def rollback(self, version: int | None = None) -> int:
        """Serve an earlier version again (default: the current one's parent)."""
        version = self.registry.rollback(version)
        self.follow()
        return version

"""Experience replay: mix images kept from earlier steps into every training batch."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from everseg.learn.losses import compute_class_weights
from everseg.learn.memory import POLICIES, ReplayMemory
from everseg.learn.plugins import Batch
from everseg.learn.strategies.base import RunStart, Strategy


class Replay(Strategy):
    """Rehearsal with a fixed-size memory (Rebuffi et al., iCaRL, CVPR 2017; Chaudhry et al. 2019).

    Each batch gets ``fraction x batch size`` (at least one) memory images, augmented like
    the step's data. The strategy owns its :class:`~everseg.learn.memory.ReplayMemory`: it
    loads the one stored with the base model (or starts one of ``memory_size`` images whose
    ``memory_policy``, reservoir or class-balanced, chooses what it keeps), offers it each
    step's images after the step, and saves it beside every model, so a later session
    continues from it. A base model without a stored memory: the memory is filled from step
    0's images, which that model learned from.

    In class-incremental scenarios with a background class, a stored mask's background
    means "none of the classes known when it was stored". Once later steps have taught
    other classes that no longer holds for them (a stored image's pole is background in its
    mask), so replaying it as background would teach the new classes away: those pixels
    are ignored instead (``stale_background="ignore"``, the default; ``"keep"`` replays the
    masks as stored).

    Class weights computed from the data (``loss.class_weights`` such as
    ``median_frequency``) come from the step's images alone, where old classes never appear
    and so get weight 1. ``memory_in_weights=True`` computes them from what the step trains
    on instead: its images plus the memory, each stored image counted as often as it is
    replayed. That lowers the weight of replayed Sky and Road. Measured on CamVid
    (benchmarks/README.md), this helped MiB+replay on camvid-6-5 (44.0 to 47.1). It hurt
    MiB+replay on camvid-6-1 (44.5 to 42.0) and plain replay on camvid-6-5 (41.6 to 29.1):
    old classes need the higher weight, against step images that label them background.
    So it is off by default.

    Args:
        fraction: replayed images per batch, relative to the batch size.
        stale_background: ``ignore`` or ``keep`` (see above).
        memory_in_weights: count the memory in data-computed class weights (see above).
        memory_size: images the memory keeps (a stored memory's budget becomes this too).
        memory_policy: ``class_balanced`` or ``reservoir`` (:mod:`everseg.learn.memory`).
    """

    name = "replay"
    uses_memory = True

    def __init__(self, fraction: float = 0.5, seed: int = 0, stale_background: str = "ignore",
                 memory_in_weights: bool = False, memory_size: int = 20, memory_policy: str = "class_balanced"):
        super().__init__()
        if fraction <= 0:
            raise ValueError("replay fraction must be positive")
        if stale_background not in ("ignore", "keep"):
            raise ValueError(f"replay stale_background must be 'ignore' or 'keep', got {stale_background!r}")
        if memory_size < 0:
            raise ValueError(f"replay memory_size must be >= 0, got {memory_size}")
        if memory_policy not in POLICIES:
            raise ValueError(f"replay memory_policy must be one of {sorted(POLICIES)}, got {memory_policy!r}")
        self.fraction = fraction
        self.stale_background = stale_background
        self.memory_in_weights = memory_in_weights
        self.memory_size = memory_size
        self.memory_policy = memory_policy
        self.memory: ReplayMemory | None = None  # given by the caller, else made by begin_run
        self._fill_from_base = False  # a base model without a stored memory: keep step 0's images
        self._stale_before: int | None = None  # memory items stored before this step index: background ignored
        self.rng = random.Random(seed)

    def begin_run(self, run: RunStart) -> None:
        if self.memory is not None:
            return
        stored = None if run.base_model is None else run.base_model / "memory"
        if stored is not None and (stored / "memory.json").is_file():
            self.memory = ReplayMemory.load(stored)  # the base model's own memory: replay what it learned from
            self.memory.budget = self.memory_size
        else:
            self.memory = ReplayMemory(self.memory_size, policy=self.memory_policy, seed=run.seed)
            self._fill_from_base = run.base_model is not None

    def learned_elsewhere(self, ctx) -> None:
        if self._fill_from_base and self.memory is not None:
            self.memory.update(ctx.step.train, step=ctx.step_index)

    def end_step(self, ctx, trainer) -> None:
        if self.memory is not None:
            self.memory.update(ctx.step.train, step=ctx.step_index)

    def save(self, model_dir: Path) -> None:
        if self.memory is not None:
            self.memory.save(model_dir / "memory")  # travels with the model it belongs to

    def on_fit_start(self, trainer) -> None:
        memory = self.memory
        method = trainer.config.loss.class_weights
        # Only weights the recipe computes from data can be recomputed; "none" leaves the criterion unweighted.
        if (not self.memory_in_weights or not memory or not isinstance(method, str)
                or getattr(trainer.criterion, "class_weights", None) is None):
            return
        ls = trainer.train_set.label_space
        step_counts = trainer.train_set.class_pixel_counts(per_image=True)
        replays = self.fraction * len(step_counts) / len(memory)  # times each stored image is replayed per pass
        stored = memory.pixel_counts(ls.num_classes, ls.ignore_index, self._stale_before) * replays
        weights = compute_class_weights(np.concatenate([step_counts, stored]), method,
                                        trainer.config.loss.max_class_weight)
        trainer.criterion.class_weights = weights.to(trainer.criterion.class_weights.device)

    def before_forward(self, trainer, batch: Batch) -> None:
        if self.memory is None or len(self.memory) == 0:
            return
        k = max(1, round(batch.image.shape[0] * self.fraction))
        replay = self.memory_batch(trainer, k, batch.image.shape[-2:])
        batch.image = torch.cat([batch.image, replay.image]).contiguous(
            memory_format=torch.channels_last if batch.image.is_contiguous(memory_format=torch.channels_last)
            and not batch.image.is_contiguous() else torch.contiguous_format)
        batch.mask = torch.cat([batch.mask, replay.mask])
        batch.stems = batch.stems + replay.stems
        batch.extra["replayed"] = k

    def memory_batch(self, trainer, k: int, size) -> Batch:
        """``k`` images drawn from the memory, augmented like the step's data, at ``size`` (h, w)."""
        data = self.memory.as_dataset(trainer.train_set.transform)
        items = [data[self.rng.randrange(len(data))] for _ in range(k)]
        images, masks = [], []
        ignore = trainer.train_set.label_space.ignore_index
        for it in items:
            img, m = it["image"], it["mask"]
            if self._background_is_stale(it["step"]):
                m = m.masked_fill(m == 0, ignore)
            if tuple(img.shape[-2:]) != tuple(size):  # no crop in the config: match the batch's size
                img = F.interpolate(img[None].float(), size=size, mode="bilinear",
                                    align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
                m = F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0].long()
            images.append(img)
            masks.append(m)
        return trainer.to_batch({"image": torch.stack(images), "mask": torch.stack(masks),
                                 "stem": [it["stem"] for it in items]})

    def begin_step(self, ctx) -> None:
        super().begin_step(ctx)
        # Only a step that adds classes makes older background stale (domain steps add none);
        # decided once per step, not for every replayed image.
        self._stale_before = ctx.step_index if self.stale_background == "ignore" and ctx.background_shift else None

    def _background_is_stale(self, stored_at: int) -> bool:
        return self._stale_before is not None and stored_at < self._stale_before

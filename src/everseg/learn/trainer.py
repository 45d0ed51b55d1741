"""The one training loop. Read ``Trainer.fit`` top to bottom; methods plug in through hooks.

Each epoch is checkpointed atomically (``checkpoint.pt`` in the run folder), so an
interrupted run continues with ``fit(resume=True)`` and loses at most the epoch
it was in. The best model by validation mIoU (or the last, without validation)
is saved as an everseg model folder in ``<out>/model``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from everseg.atomic import atomic_torch_save, atomic_write_json, atomic_write_text
from everseg.data.dataset import SegmentationDataset
from everseg.devices import choose_precision, resolve_device
from everseg.learn import distributed
from everseg.learn.auxiliary import AuxiliaryHead, auxiliary_head
from everseg.learn.config import RunConfig
from everseg.learn.ema import WeightAverage
from everseg.learn.losses import LossShape, SegmentationLoss, compute_class_weights
from everseg.learn.optim import build_optimizer, build_scheduler
from everseg.learn.plugins import Batch, Plugin, StepOutput
from everseg.learn.progress import TrainProgress

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_DIR_NAME = "model"


class _Float32Conv2d(nn.Conv2d):
    """A convolution that runs in float32 and NCHW whatever autocast asks (see below)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float().contiguous())


class _RestoreClass:
    def __init__(self, module: nn.Module, cls: type):
        self.module, self.cls = module, cls

    def remove(self) -> None:
        self.module.__class__ = self.cls


def dilated_depthwise_in_float32(model: nn.Module) -> list:
    """Run the dilated depthwise convolutions of ``model`` in float32 and NCHW; returns handles
    whose ``remove()`` undoes it.

    Why: on CPUs with native bfloat16 (AMX), oneDNN as shipped with torch 2.14 computes wrong
    weight gradients for dilated depthwise convolutions in bfloat16: with channels-last tensors
    on wide feature maps (single-image online updates then collapsed the holdout mIoU to 1-10),
    and, on the Intel Xeon of 2026-12-05, with NCHW ones too when the input comes from a
    channels-last layer (gradients of 1e31). In float32 they are right, and on that CPU faster
    too: a bfloat16 training step of LR-ASPP MobileNetV2 (batch 8, 288x384) took 1.17 s with
    them in float32 against 1.47 s without. The rest of the model stays bfloat16, channels-last.
    The class is swapped rather than the layer wrapped, so state dicts and copies are unchanged.
    """
    handles = []
    for m in model.modules():
        if (type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels
                and max(m.dilation) > 1):
            m.weight.data = m.weight.data.contiguous()
            m.__class__ = _Float32Conv2d
            handles.append(_RestoreClass(m, nn.Conv2d))
    return handles


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class FitResult:
    best_miou: float | None  # best validation mIoU (0-100), None without validation
    best_epoch: int | None  # 0-based epoch of the best model
    epochs_run: int  # epochs completed, over all resumed sessions
    stopped_early: bool
    seconds: float  # wall time of this session
    train_seconds: float  # wall time of all epochs (validation included), over all sessions
    images_seen: int  # training images processed, over all sessions
    model_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains ``model`` on ``train_set``, validating on ``val_set``, writing into ``out_dir``.

    The time budget is ``config.train.max_minutes``: the learning rate decays within it and
    training stops before a step that would not end inside it. ``budget_spent``: seconds of that
    budget already used before the Trainer was made (an incremental step's strategy set-up,
    which is part of what the step costs); counted in ``train_seconds`` too.
    """

    def __init__(self, model: nn.Module, train_set: SegmentationDataset,
                 val_set: SegmentationDataset | None, config: RunConfig, out_dir: str | Path, *,
                 plugins: Sequence[Plugin] = (), progress: bool = True,
                 criterion: nn.Module | None = None, write_run: bool = True, budget_spent: float = 0.0):
        self.model = model
        self.train_set = train_set
        self.val_set = val_set
        self.config = config
        self.out_dir = Path(out_dir)
        self.plugins = list(plugins)
        tc = config.train
        # Under torchrun: one process per device, process 0 writes (learn/distributed.py).
        self.world = distributed.current_world()
        main = self.world is None or self.world.main
        self.show_progress = progress and main
        # False for short in-memory updates (the online learner): no run folder, checkpoint,
        # TensorBoard or saved model; the caller keeps the model.
        self.write_run = write_run and main
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = resolve_device(tc.device)
        if self.world is not None:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.world.local_rank)
            distributed.check_data_parallel(tc.batch_size, tc.finetune, self.world.size)
        self.precision = choose_precision(self.device, tc.bf16)
        # Evaluation autocasts only to bfloat16; float16 training validates in float32.
        self.use_bf16 = self.precision.dtype == torch.bfloat16
        self.scaler = self.precision.grad_scaler()
        # The model is moved now, before plugins and strategies copy or measure it.
        self.model.to(self.device)
        self.criterion = criterion if criterion is not None else self._default_criterion()
        # loss.aux_weight: a head on the backbone's middle, only while the backbone trains.
        self.auxiliary: AuxiliaryHead | None = None
        self._aux_stage = 0
        if config.loss.aux_weight > 0 and tc.finetune != "frozen":
            if not isinstance(self.criterion, SegmentationLoss):
                raise ValueError(f"loss.aux_weight needs the recipe's own loss, not a "
                                 f"{type(self.criterion).__name__}")
            self.auxiliary, self._aux_stage = auxiliary_head(model)
            self.auxiliary.to(self.device)
        # What a step runs the model through (fit wraps it for data-parallel training).
        self._forward: nn.Module = self.model
        self._needs_features = self._wants_features()
        # Loop state; everything here is saved in the checkpoint.
        self.epoch = 0
        self.global_step = 0
        self.images_seen = 0
        self.train_seconds = budget_spent  # epochs' wall time over all resumed sessions
        self._epoch_start: float | None = None
        # Wall time of one optimizer step (smoothed): the budget stops the loop before a step it
        # cannot finish, so a run ends inside its budget, not up to one step past it.
        self._step_seconds = 0.0
        self._wrap_up_images = 0  # what the plugins will run through the model after training
        self.best_miou: float | None = None
        self.best_epoch: int | None = None
        self.stale_validations = 0
        self.history: list[dict[str, Any]] = []
        self.stop_requested = False
        # train.ema_decay: the averaged weights are validated, saved and left in the model at the end.
        self.average: WeightAverage | None = None

    # ------------------------------------------------------------------ set-up helpers
    def _default_criterion(self) -> nn.Module:
        lc = self.config.loss
        ls = self.train_set.label_space
        weights = None
        if lc.class_weights != "none":
            weights = compute_class_weights(self.train_set.class_pixel_counts(per_image=True),
                                            lc.class_weights, lc.max_class_weight)
        return SegmentationLoss(lc.kind, class_weights=weights, ignore_index=ls.ignore_index,
                                dice_weight=lc.dice_weight, lovasz_weight=lc.lovasz_weight,
                                label_smoothing=lc.label_smoothing)

    def _wants_features(self) -> bool:
        return self.auxiliary is not None or any(p.needs_features for p in self.plugins)

    def loss_terms(self, batch: Batch, output: StepOutput) -> dict[str, torch.Tensor]:
        """The step's loss terms: the recipe's segmentation loss as the plugins shape it (``"seg"``),
        the auxiliary head's cross-entropy under the same shape (``"aux"``), then each plugin's own terms."""
        shape = LossShape()
        for plugin in self.plugins:
            plugin.shape_loss(self, batch, output, shape)
        if shape.plain:
            terms = {"seg": self.criterion(output.logits, batch.mask)}
        elif isinstance(self.criterion, SegmentationLoss):
            terms = {"seg": self.criterion(output.logits, batch.mask, shape)}
        else:
            raise ValueError(f"a strategy shapes the segmentation loss, which this Trainer's own criterion "
                             f"({type(self.criterion).__name__}) does not support")
        if self.auxiliary is not None:
            logits = self.auxiliary(output.features["backbone"][self._aux_stage], batch.mask.shape[-2:])
            terms["aux"] = self.config.loss.aux_weight * self.criterion.cross_entropy(logits, batch.mask, shape)
        for plugin in self.plugins:
            extra = plugin.loss_terms(self, batch, output)
            if "seg" in extra:
                raise ValueError(f"{type(plugin).__name__}.loss_terms returned 'seg': the segmentation loss is "
                                 f"changed through shape_loss, so that strategies compose")
            terms.update(extra)
        return terms

    def _forward_terms(self, batch: Batch) -> tuple[StepOutput, dict[str, torch.Tensor]]:
        """The plugins' batch hooks, the forward pass and the loss terms of one step."""
        for plugin in self.plugins:
            plugin.before_forward(self, batch)
        with self.autocast():
            if self._needs_features:
                logits, feats = self._forward(batch.image, return_features=True)
            else:
                logits, feats = self._forward(batch.image), None
            output = StepOutput(logits, feats)
            for plugin in self.plugins:
                plugin.after_forward(self, batch, output)
            return output, self.loss_terms(batch, output)

    def _apply_gradients(self) -> bool:
        """The optimiser step on the accumulated gradients; False when a float16 step overflowed
        and was skipped (the scale is lowered)."""
        # Plugins and clipping see true gradients, not float16-scaled ones.
        self.scaler.unscale_(self.optimizer)
        if self.auxiliary is not None and self.world is not None:
            # DDP averages the model's gradients over the processes; the head lives outside it.
            for p in self.auxiliary.parameters():
                if p.grad is not None:
                    p.grad.copy_(distributed.mean_over_processes(p.grad))
        for plugin in self.plugins:
            plugin.after_backward(self)
        if self.config.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        scale = self.scaler.get_scale() if self.precision.scaled else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return scale is None or self.scaler.get_scale() >= scale

    def nested_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimiser step on ``batch`` inside the loop's current one, for methods whose update
        nests steps (MER's per-example steps): every plugin's hooks apply as in the loop, the LR
        stays where the schedule has it and the step count does not advance. Gradients the loop
        has accumulated so far are dropped: call it before the loop's forward pass (in
        ``before_forward``) or after its step (``after_step``)."""
        self.optimizer.zero_grad(set_to_none=True)
        _, terms = self._forward_terms(batch)
        self.scaler.scale(sum(terms.values())).backward()
        self._apply_gradients()
        return {k: v.detach() for k, v in terms.items()}

    def _loader(self, generator: torch.Generator) -> DataLoader:
        dc, tc = self.config.data, self.config.train
        self._sampler = None
        if self.world is not None:
            from torch.utils.data.distributed import DistributedSampler

            # Each process its own share of every epoch, reshuffled by seed and epoch (set_epoch).
            self._sampler = DistributedSampler(self.train_set, num_replicas=self.world.size, rank=self.world.rank,
                                               shuffle=True, seed=tc.seed)
        return DataLoader(self.train_set, batch_size=tc.batch_size // self.processes,
                          shuffle=self._sampler is None, sampler=self._sampler,
                          drop_last=len(self.train_set) >= tc.batch_size,
                          num_workers=dc.num_workers, persistent_workers=dc.num_workers > 0,
                          worker_init_fn=_worker_init, generator=generator,
                          # Page-locked batches copy to a GPU asynchronously; on the CPU pinning is a wasted copy.
                          pin_memory=self.device.type == "cuda")

    def to_batch(self, raw: dict[str, Any]) -> Batch:
        """A loader's (or a plugin's) uint8 batch as the model takes it: on the device, float in [0, 1]."""
        blocking = self.device.type != "cuda"
        # uint8 crosses to the device (a quarter of float32's bytes), then becomes float there.
        image = raw["image"].to(self.device, non_blocking=not blocking).float().div_(255.0)
        if self.config.train.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return Batch(image=image, mask=raw["mask"].to(self.device, non_blocking=not blocking),
                     stems=list(raw["stem"]))

    @property
    def processes(self) -> int:
        """How many processes train together (1 without torchrun)."""
        return 1 if self.world is None else self.world.size

    def autocast(self):
        """The mixed-precision context of this run's forward passes (plugins running models use it too)."""
        return self.precision.autocast()

    def _data_summary(self) -> str:
        parts = []
        for role, ds in (("train", self.train_set), ("val", self.val_set)):
            if ds is not None:
                where = (f"decoded in memory, {ds.memory_bytes() / 2**20:.0f} MiB" if ds.is_cached
                         else "decoded from disk each epoch")
                parts.append(f"{role}: {len(ds)} images ({where})")
        where = (f"{self.device} ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda"
                 else str(self.device))
        threads = torch.get_num_threads()
        return (f"{'; '.join(parts)}; {where}, {self.precision.name}, "
                f"{threads} CPU thread{'s' if threads != 1 else ''}")

    def request_stop(self) -> None:
        """Ask the loop to stop after the current epoch (plugins, signal handlers)."""
        self.stop_requested = True

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> FitResult:
        cfg, tc = self.config, self.config.train
        generator = seed_everything(tc.seed)
        if tc.channels_last:
            self.model.to(memory_format=torch.channels_last)
            if self.auxiliary is not None:
                self.auxiliary.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg.optim,
                                         extra=[self.auxiliary] if self.auxiliary is not None else [])
        loader = self._loader(generator)
        steps_per_epoch = max(1, len(loader) // tc.grad_accum)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps=steps_per_epoch * tc.epochs,
                                         steps_per_epoch=steps_per_epoch,
                                         time_progress=self.budget_used if tc.max_minutes else None)
        if tc.ema_decay:
            # Made after the model's final layout and before a resume reads the saved average.
            self.average = WeightAverage(self.model, tc.ema_decay)
        if resume:
            self._load_checkpoint(generator)
        # Only now, after a resume's checkpoint was read and accepted: a refused resume must
        # leave the run as it was, its config.yaml included.
        if self.write_run:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "config.yaml", cfg.to_yaml())
        for plugin in self.plugins:
            for frozen in plugin.frozen_models():
                frozen.to(self.device)
                if tc.channels_last:
                    # It takes the trained model's channels-last images and features: in the
                    # other layout the previous model's decoder ran 2.4-3x slower on the CPU.
                    frozen.to(memory_format=torch.channels_last)
        progress = TrainProgress(tc.epochs, len(loader), enabled=self.show_progress)
        if resume:
            done = (f"{self.epoch} of {tc.epochs} epochs done, {self.train_seconds / 60:.1f} min"
                    + (f", best val mIoU {self.best_miou:.2f}" if self.best_miou is not None else ""))
            nothing = "; nothing left to train" if self.epoch >= tc.epochs else f"; continuing at epoch {self.epoch + 1}"
            log.info("resumed %s (%s)%s", self.out_dir / CHECKPOINT_NAME, done, nothing)
        progress.message(self._data_summary())
        writer = self._tensorboard()
        setup_start = time.perf_counter()
        for plugin in self.plugins:
            plugin.on_fit_start(self)
        # Wrapped after the plugins set which weights train (a frozen backbone): DDP fixes them now.
        self._forward = self._data_parallel() if self.world is not None else self.model
        self._needs_features = self._wants_features()
        self._wrap_up_images = sum(p.wrap_up_images(self) for p in self.plugins)
        if not resume:
            # Plugins' set-up passes (e.g. PLOP's pseudo-label thresholds) are part of what the
            # training costs, so they count against the time budget.
            self.train_seconds += time.perf_counter() - setup_start

        session_start = time.perf_counter()
        epochs_this_session = 0
        float32_swaps = (dilated_depthwise_in_float32(self.model)
                         if self.use_bf16 and tc.channels_last and self.device.type == "cpu" else [])
        try:
            while self.epoch < tc.epochs and not self.stop_requested:
                if self.epoch > 0 and distributed.any_process(not self._next_step_fits(), self.device):
                    progress.message(f"time budget of {tc.max_minutes} min used after {self.epoch} epochs")
                    break
                self.model.train()
                if self.auxiliary is not None:
                    self.auxiliary.train()
                for plugin in self.plugins:
                    plugin.on_epoch_start(self)
                progress.start_epoch(self.epoch)
                if self._sampler is not None:
                    self._sampler.set_epoch(self.epoch)
                epoch_start = self._epoch_start = time.perf_counter()
                last_step_end = epoch_start
                loss_sum = torch.zeros((), device=self.device)
                term_sums: dict[str, torch.Tensor] = {}
                n_batches = 0
                out_of_time = False
                self.optimizer.zero_grad(set_to_none=True)
                for i, raw in enumerate(loader):
                    batch = self.to_batch(raw)
                    output, terms = self._forward_terms(batch)
                    loss = sum(terms.values())
                    self.scaler.scale(loss / tc.grad_accum).backward()
                    stepped = False
                    if (i + 1) % tc.grad_accum == 0:
                        # The LR schedule waits for a step that happened (not one skipped for overflow).
                        stepped = self._apply_gradients()
                        if stepped:
                            self.scheduler.step()
                        self.global_step += 1
                        now = time.perf_counter()
                        took, last_step_end = now - last_step_end, now
                        self._step_seconds = took if not self._step_seconds else 0.8 * self._step_seconds + 0.2 * took
                        # A budget is a budget: an epoch longer than what is left is cut, not finished
                        # (its LR has already decayed to zero by time, so the rest would be wasted).
                        out_of_time = distributed.any_process(not self._next_step_fits(), self.device)
                    for plugin in self.plugins:
                        plugin.after_step(self, batch, output)
                    if stepped and self.average is not None:
                        # After the plugins: the weights they pin back (EWF's old rows) are averaged pinned.
                        self.average.update(self.model)
                    loss_sum += loss.detach().float()
                    for k, v in terms.items():
                        term_sums[k] = term_sums.get(k, torch.zeros((), device=self.device)) + v.detach().float()
                    n_batches += 1
                    self.images_seen += batch.image.shape[0] * self.processes
                    if (i + 1) % tc.log_every == 0 or i + 1 == len(loader) or out_of_time:
                        mean_loss = float(loss_sum) / n_batches
                        if distributed.any_process(not math.isfinite(mean_loss), self.device):
                            raise self._diverged(i + 1, term_sums, n_batches)
                        seconds = time.perf_counter() - epoch_start
                        ips = n_batches * tc.batch_size / max(seconds, 1e-9)
                        progress.update(i + 1, mean_loss, ips, self.current_lr())
                        if writer is not None:
                            writer.add_scalar("train/loss", float(loss.detach()), self.global_step)
                            writer.add_scalar("train/lr", self.current_lr(), self.global_step)
                    if out_of_time:
                        break
                if n_batches == 0:
                    raise RuntimeError(f"training set of {len(self.train_set)} images gave no batch")

                seconds = time.perf_counter() - epoch_start
                # Every process saw as many batches (the sampler pads, the budget is decided together).
                loss_sum = distributed.mean_over_processes(loss_sum)
                term_sums = {k: distributed.mean_over_processes(v) for k, v in term_sums.items()}
                record: dict[str, Any] = {"epoch": self.epoch, "loss": float(loss_sum) / n_batches,
                                          "seconds": seconds,
                                          "images_per_second": n_batches * tc.batch_size / seconds,
                                          "lr": self.current_lr()}
                record.update({f"loss_{k}": float(v) / n_batches for k, v in term_sums.items()
                               if len(term_sums) > 1})
                last_epoch = self.epoch + 1 == tc.epochs or out_of_time
                if self.val_set is not None and ((self.epoch + 1) % tc.eval_every == 0 or last_epoch):
                    with self._averaged():
                        metrics = self.validate()
                        record["val_miou"] = metrics.miou
                        for plugin in self.plugins:
                            plugin.on_validation(self, metrics)
                        self._track_best(record["val_miou"])
                elif self.val_set is None and self.write_run:
                    with self._averaged():
                        self._save_model()  # without validation the latest model is the one to keep
                self.history.append(record)
                self.train_seconds += time.perf_counter() - epoch_start
                self._epoch_start = None  # counted in train_seconds now; budget_used must not count it twice
                self.epoch += 1
                epochs_this_session += 1
                if writer is not None:
                    for k in ("loss", "images_per_second", "val_miou"):
                        if k in record:
                            writer.add_scalar(f"epoch/{k}", record[k], self.epoch)
                    writer.flush()
                if tc.early_stopping is not None and self.stale_validations >= tc.early_stopping:
                    progress.message(f"early stopping: no mIoU gain in {self.stale_validations} validations")
                    self.stop_requested = True
                if self.write_run:
                    self._save_checkpoint(generator)
                progress.end_epoch(self.epoch - 1, {k: v for k, v in record.items()
                                                    if k in ("loss", "images_per_second", "val_miou")},
                                   epochs_this_session, budget_left_seconds=self._budget_left_seconds())
                for plugin in self.plugins:
                    plugin.on_epoch_end(self)
        finally:
            for swap in float32_swaps:
                swap.remove()
            progress.close()
            if writer is not None:
                writer.close()
        if self.average is not None:
            # What the run trained is the averaged model: the plugins' wrap-up (importance,
            # memory) and the caller see it, and the model saved last is it.
            self.average.copy_to(self.model)
        for plugin in self.plugins:
            plugin.on_fit_end(self)
        if self.write_run:
            if not (self.out_dir / MODEL_DIR_NAME / "config.json").is_file():
                self._save_model()
            atomic_write_json(self.out_dir / "history.json", self.history)
        distributed.barrier()  # the model is written before any process reports it
        return FitResult(best_miou=self.best_miou, best_epoch=self.best_epoch, epochs_run=self.epoch,
                         stopped_early=self.epoch < tc.epochs, seconds=time.perf_counter() - session_start,
                         train_seconds=self.train_seconds,
                         images_seen=self.images_seen, model_dir=self.out_dir / MODEL_DIR_NAME,
                         history=self.history)

    # ------------------------------------------------------------------ pieces of the loop
    def _averaged(self):
        """The block sees the model with the averaged weights, if the run keeps an average."""
        return self.average.swapped_into(self.model) if self.average is not None else nullcontext()

    def _diverged(self, step: int, term_sums: dict[str, torch.Tensor], n_batches: int) -> FloatingPointError:
        terms = ", ".join(f"{k}={float(v) / n_batches:.4g}" for k, v in term_sums.items())
        kept = (f"the checkpoint of the last finished epoch is kept in {self.out_dir / 'checkpoint.pt'}; "
                if self.write_run and self.epoch > 0 else "")
        return FloatingPointError(
            f"training diverged in epoch {self.epoch + 1}, step {step}: the loss is not finite "
            f"(mean terms so far: {terms}); {kept}lower optim.lr or the weight of the term that blew up")

    @property
    def wrap_up_estimate(self) -> float:
        """Seconds the plugins' work after training should take: their ``wrap_up_images`` at
        the speed of the recent optimizer steps."""
        tc = self.config.train
        return self._wrap_up_images * self._step_seconds / (tc.batch_size * tc.grad_accum)

    @property
    def reserved_seconds(self) -> float:
        """Time of ``train.max_minutes`` kept for the plugins' work after training (at most half)."""
        budget = self.config.train.max_minutes
        return min(budget * 30, self.wrap_up_estimate) if budget else 0.0

    def budget_used(self, ahead: float = 0.0) -> float:
        """Share of ``train.max_minutes``, less the time reserved for the plugins' wrap-up, spent
        so far (0 without a budget); drives the LR decay.

        ``ahead``: seconds of work about to start, counted as if already spent (will it fit?).
        """
        budget = self.config.train.max_minutes
        if not budget:
            return 0.0
        running = time.perf_counter() - self._epoch_start if self._epoch_start is not None else 0.0
        return min(1.0, (self.train_seconds + running + ahead) / (budget * 60 - self.reserved_seconds))

    def _budget_left_seconds(self) -> float | None:
        budget = self.config.train.max_minutes
        return None if budget is None else (1.0 - self.budget_used()) * budget * 60

    def _next_step_fits(self) -> bool:
        """Whether one more optimizer step, as long as the recent ones, ends inside the time budget."""
        return self.config.train.max_minutes is None or self.budget_used(self._step_seconds) < 1.0

    def current_lr(self) -> float:
        """LR of the head (the largest group LR)."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _data_parallel(self) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # Every trainable weight takes part in every step here (frozen ones are left out when
        # the wrapper is made); learn and scenario run, whose strategies may differ, do not run
        # data-parallel yet.
        return DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                       else None)

    def validate(self):
        from everseg.evaluate import evaluate

        ec = self.config.eval
        crop = ec.crop_size or self.config.data.crop_size
        val_set = self.val_set
        if self.world is not None:  # a share each; evaluate sums the confusion matrices
            val_set = val_set.subset(list(range(self.world.rank, len(val_set), self.world.size)),
                                     name=val_set.name)
        result = evaluate(self.model, val_set, mode=ec.mode,
                          crop_size=crop if ec.mode == "slide" else None, flip=ec.flip,
                          scales=ec.scales, autocast_bf16=self.use_bf16,
                          channels_last=self.config.train.channels_last, progress=False)
        return result.metrics

    def _track_best(self, miou: float) -> None:
        if self.best_miou is None or miou > self.best_miou:
            self.best_miou, self.best_epoch = miou, self.epoch
            self.stale_validations = 0
            if self.write_run:
                self._save_model()
        else:
            self.stale_validations += 1

    def _save_model(self) -> None:
        from everseg.models import save_model

        meta = dict(getattr(self.model, "metadata", None) or {})
        meta.update({"epoch": self.epoch, "val_miou": self.best_miou, "images_seen": self.images_seen,
                     "train_data": self.train_set.name, "train_seconds": round(self.train_seconds, 1)})
        fractions = self._class_fractions()
        if fractions:  # what a service compares its predictions' class areas with (drift)
            meta["class_fractions"] = fractions
        dc = self.config.data
        if dc.path is not None:  # where the training images are: a later ``learn`` can replay them
            meta["train_data_source"] = {"path": str(Path(dc.path).resolve()), "dataset": dc.dataset,
                                         "split": dc.train_split}
        self.model.metadata = meta
        save_model(self.model, self.out_dir / MODEL_DIR_NAME)

    def _class_fractions(self) -> dict[str, float] | None:
        """Share of the labelled training pixels per class; only when the images are decoded in
        memory already (counting would otherwise decode the whole set again)."""
        if getattr(self, "_fractions", None) is None and self.train_set.is_cached:
            counts = self.train_set.class_pixel_counts().astype(np.float64)
            names = self.train_set.label_space.names
            total = counts.sum()
            self._fractions = {n: float(c / total) for n, c in zip(names, counts)} if total else {}
        return getattr(self, "_fractions", None)

    def _tensorboard(self):
        if not self.write_run:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but training must not die without it
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, generator: torch.Generator) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loop": {"epoch": self.epoch, "global_step": self.global_step, "images_seen": self.images_seen,
                     "train_seconds": self.train_seconds,
                     "best_miou": self.best_miou, "best_epoch": self.best_epoch,
                     "stale_validations": self.stale_validations, "history": self.history},
            "plugins": [p.state_dict() for p in self.plugins],
            "average": self.average.state_dict() if self.average is not None else None,
            "auxiliary": self.auxiliary.state_dict() if self.auxiliary is not None else None,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(), "loader": generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None},
            "config": self.config.model_dump(mode="json"),
        }
        atomic_torch_save(self.out_dir / CHECKPOINT_NAME, state)

    def _load_checkpoint(self, generator: torch.Generator) -> None:
        path = self.out_dir / CHECKPOINT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise RuntimeError(f"{path}: checkpoint cannot be read ({exc})") from exc
        saved, current = state.get("config", {}), self.config.model_dump(mode="json")
        for section in ("model", "data"):
            if saved.get(section) != current.get(section):
                raise ValueError(f"{path}: the checkpoint's {section!r} settings differ from this "
                                 f"run's; resume with the same configuration (see {self.out_dir}/config.yaml)")
        if (self.average is None) != (state.get("average") is None):
            was = "off" if state.get("average") is None else "on"
            raise ValueError(f"{path}: the checkpoint was made with train.ema_decay {was}; resume with the "
                             f"same configuration (see {self.out_dir}/config.yaml)")
        if (self.auxiliary is None) != (state.get("auxiliary") is None):
            was = "without" if state.get("auxiliary") is None else "with"
            raise ValueError(f"{path}: the checkpoint was made {was} an auxiliary head (loss.aux_weight); "
                             f"resume with the same configuration (see {self.out_dir}/config.yaml)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.precision.scaled:
            self.scaler.load_state_dict(state["scaler"])
        loop = state["loop"]
        self.epoch, self.global_step = loop["epoch"], loop["global_step"]
        self.images_seen, self.history = loop["images_seen"], loop["history"]
        self.train_seconds = loop.get("train_seconds", 0.0)
        self.best_miou, self.best_epoch = loop["best_miou"], loop["best_epoch"]
        self.stale_validations = loop["stale_validations"]
        for plugin, pstate in zip(self.plugins, state.get("plugins", [])):
            plugin.load_state_dict(pstate)
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        if self.auxiliary is not None:
            self.auxiliary.load_state_dict(state["auxiliary"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["loader"])
        # CUDA's generators only when saved on as many GPUs: a run may resume on another device.
        cuda_states = rng.get("cuda")
        if cuda_states and self.device.type == "cuda" and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    return json.loads((Path(run_dir) / "history.json").read_text())

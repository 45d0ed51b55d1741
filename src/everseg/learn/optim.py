"""Optimiser with discriminative learning rates, and warm-up + poly/cosine schedules."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from everseg.learn.config import OptimConfig


def _split_decay(params: list[tuple[str, nn.Parameter]]) -> tuple[list, list]:
    # Norm scales and biases are not weights to shrink: decaying them hurts accuracy.
    decay, no_decay = [], []
    for name, p in params:
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return decay, no_decay


def parameter_groups(model: nn.Module, cfg: OptimConfig, extra: Sequence[nn.Module] = ()) -> list[dict]:
    """Backbone and head groups (backbone LR = lr x backbone_lr_factor), each split by decay;
    ``extra`` modules trained beside the model (the auxiliary head) join the head's groups.

    Frozen parameters are included too, so that unfreezing later needs no new
    optimiser; they get no gradient while frozen and so are not updated.
    """
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    named = list(model.named_parameters())
    named += [(f"extra{i}.{n}", p) for i, module in enumerate(extra) for n, p in module.named_parameters()]
    groups = []
    for part, factor in (("backbone", cfg.backbone_lr_factor), ("head", 1.0)):
        params = [(n, p) for n, p in named if (id(p) in backbone_ids) == (part == "backbone")]
        decay, no_decay = _split_decay(params)
        for plist, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            if plist:
                groups.append({"params": plist, "lr": cfg.lr * factor, "weight_decay": wd,
                               "lr_factor": factor, "name": f"{part}{'' if wd else '_no_decay'}"})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, extra: Sequence[nn.Module] = ()) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg, extra)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig,
                  time_progress: float = 0.0) -> float:
    """Fraction of the peak LR at optimiser step ``step`` (0-based).

    ``time_progress`` (0..1, the share of a time budget used) moves the decay along when the
    budget, not the step count, will end training: the schedule follows whichever is further.
    """
    if warmup_steps and step < warmup_steps:
        # Under a time budget the warm-up keeps its share of the planned schedule in time too:
        # a short step must not spend its whole budget warming up.
        share = warmup_steps / max(1, total_steps)
        warm = max((step + 1) / warmup_steps, time_progress / share)
        if warm < 1.0:
            return warm
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max((step - warmup_steps) / span, time_progress))
    if cfg.schedule == "poly":
        decayed = (1.0 - progress) ** cfg.poly_power
    elif cfg.schedule == "cosine":
        decayed = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decayed = 1.0
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decayed


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, total_steps: int,
                    steps_per_epoch: int,
                    time_progress: Callable[[], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    clock = time_progress or (lambda: 0.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, cfg, clock()))

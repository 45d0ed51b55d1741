"""Training a smaller model to answer like a larger one: knowledge distillation.

``everseg distill`` trains a new, smaller architecture (the student) on the user's data with
the labels' loss plus a distillation term from a trained model (the teacher);
``everseg compress`` prunes a trained model's channels (:mod:`everseg.deploy.prune`) and
fine-tunes what is left the same way, the unpruned model teaching it. Both run the one
training loop (:class:`~everseg.learn.trainer.Trainer`) with :class:`TeacherDistillation`
as a plugin, and both write an ordinary run folder whose ``model/`` exports, quantises and
keeps learning like any other everseg model.

The distillation terms, computed on the same augmented crops the student trains on:

- pixel-wise KL (Hinton et al. 2015, as used for segmentation by SKD, Liu et al. CVPR
  2019, and CIRKD, Yang et al. CVPR 2022): ``T^2 * KL(softmax(t/T) || softmax(s/T))``
  per pixel, averaged over all pixels (unlabelled ones included: the teacher has an
  answer there too);
- channel-wise (CWD, Shu et al. ICCV 2021), on by default for ``distill`` where it paid
  (+3.1 mIoU over the pixel term alone, see :func:`distill_model`): per class map, a softmax over the
  image's pixels at temperature ``T_c``, and the KL between the teacher's and the
  student's spatial distributions, averaged over images and classes, times ``T_c^2``. It
  transfers where each class lies in the image rather than each pixel's class mixture.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from everseg.learn.config import RunConfig
from everseg.learn.plugins import Batch, Plugin, StepOutput
from everseg.learn.rundir import claim_run_folder

log = logging.getLogger(__name__)


def pixel_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over pixels of KL(teacher || student) of the class distributions at ``temperature``, x T^2."""
    t = teacher.float() / temperature
    log_q = t.log_softmax(1)
    log_p = (student.float() / temperature).log_softmax(1)
    return (log_q.exp() * (log_q - log_p)).sum(1).mean() * temperature ** 2


def channel_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation: mean over images and classes of KL(teacher || student) of the
    distributions over pixels of each class map at ``temperature``, x T^2."""
    n, c = student.shape[:2]
    log_q = (teacher.float() / temperature).reshape(n, c, -1).log_softmax(-1)
    log_p = (student.float() / temperature).reshape(n, c, -1).log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean() * temperature ** 2


class TeacherDistillation(Plugin):
    """Adds ``weight * pixel_kl`` (and ``channel_weight * channel_kl``) against ``teacher``'s logits.

    The teacher runs in eval mode without gradients on each training batch; its classes
    must be the student's. ``record``: how the student was made, added to its metadata
    (saved with the model).
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 1.0, weight: float = 1.0,
                 channel_weight: float = 0.0, channel_temperature: float = 4.0,
                 record: dict[str, Any] | None = None):
        check_distillation_settings(temperature, weight, channel_weight, channel_temperature)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.weight = temperature, weight
        self.channel_weight, self.channel_temperature = channel_weight, channel_temperature
        self.record = dict(record or {})

    def frozen_models(self) -> list[nn.Module]:
        return [self.teacher]

    def on_fit_start(self, trainer) -> None:
        ours, theirs = list(trainer.train_set.label_space.names), list(self.teacher.label_space.names)
        if ours != theirs:
            raise ValueError(f"the teacher's classes {theirs} are not the training data's {ours}")
        if trainer.config.train.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        trainer.model.metadata = {**(getattr(trainer.model, "metadata", None) or {}), **self.record}

    def loss_terms(self, trainer, batch: Batch, output: StepOutput) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self.teacher(batch.image)
        terms = {}
        if self.weight:
            terms["kd"] = self.weight * pixel_kl(output.logits, target, self.temperature)
        if self.channel_weight:
            terms["kd_channel"] = self.channel_weight * channel_kl(output.logits, target, self.channel_temperature)
        return terms


def check_distillation_settings(temperature: float, weight: float, channel_weight: float = 0.0,
                                channel_temperature: float = 4.0) -> None:
    for name, value in (("--temperature", temperature), ("--channel-temperature", channel_temperature)):
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{name} must be a positive number, got {value}")
    for name, value in (("--kd-weight", weight), ("--channel-weight", channel_weight)):
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"{name} must be 0 or a positive number, got {value}")


def parse_student(spec: str) -> tuple[str, str]:
    """``"lraspp/mobilenet_v2"`` -> ``("lraspp", "mobilenet_v2")``; unknown names are errors."""
    from everseg.models import ARCHITECTURES
    from everseg.models.backbones import check_backbone_name

    arch, slash, backbone = spec.partition("/")
    if not slash or not arch or not backbone:
        raise ValueError(f"--student {spec!r}: expected ARCH/BACKBONE, e.g. lraspp/mobilenet_v2")
    if arch not in ARCHITECTURES:
        raise ValueError(f"--student {spec!r}: unknown architecture {arch!r}; choose from {list(ARCHITECTURES)}")
    check_backbone_name(backbone)
    return arch, backbone


def teacher_recipe(model_dir: str | Path) -> Path | None:
    """The config the model at ``model_dir`` was trained with, when it sits in its run folder."""
    from everseg.workflows import resolve_model_dir

    path = resolve_model_dir(model_dir).parent / "config.yaml"
    return path if path.is_file() else None


def _with_data(cfg: RunConfig, teacher: nn.Module, teacher_dir: Path) -> RunConfig:
    """``cfg`` with the teacher's recorded training data when it names none; its classes checked."""
    from everseg.data import open_dataset
    from everseg.data.errors import DataError
    from everseg.workflows import recorded_training_data

    dc = cfg.data
    if dc.path is None:
        source = recorded_training_data(teacher)
        if source is None:
            raise ValueError(f"no --data: {teacher_dir} does not record the data it was trained on")
        log.info("training data: %s (%s split), what %s was trained on", source.path, source.split, teacher_dir)
        dc = dc.model_copy(update={"path": source.path, "dataset": dc.dataset or source.dataset,
                                   "train_split": source.split})
        cfg = cfg.model_copy(update={"data": dc})
    names = list(open_dataset(dc.path, dataset=dc.dataset, split=dc.train_split).label_space.names)
    if names != list(teacher.label_space.names):
        raise DataError(None, f"--data {dc.path}: its classes {names} are not the teacher's "
                              f"{list(teacher.label_space.names)}; distil on data of the teacher's classes")
    return cfg


def distill_model(teacher: str | Path, student: str, cfg: RunConfig, out: str | Path, *,
                  temperature: float = 1.0, weight: float = 1.0, channel_weight: float = 3.0,
                  channel_temperature: float = 4.0, resume: bool = False, overwrite: bool = False,
                  progress: bool = True) -> Any:
    """``everseg distill``: train a new ``student`` ("ARCH/BACKBONE", ImageNet backbone as in
    ``cfg.model.pretrained``) on ``cfg``'s data, taught by the labels and by ``teacher``.

    The channel-wise term is on by default (weight 3, CWD's): on CamVid, a DeepLabV3+ teacher
    (54.6 mIoU) taught an LR-ASPP student to 56.3 with it, 53.2 with the pixel-wise term alone
    and 50.9 without distillation, at the same 6 epochs (benchmarks/README.md, deployment).
    """
    from everseg.learn.run import train
    from everseg.workflows import load_trained_model, resolve_model_dir

    check_distillation_settings(temperature, weight, channel_weight, channel_temperature)
    arch, backbone = parse_student(student)
    teacher_dir = resolve_model_dir(teacher).resolve()
    # Before any work: a run folder that cannot be used is refused first (train() checks again).
    claim_run_folder(out, resume=resume, overwrite=overwrite, protect=[teacher_dir])
    teacher_model = load_trained_model(teacher_dir)
    cfg = _with_data(cfg, teacher_model, teacher_dir)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "arch": arch, "backbone": backbone, "init_from": None,
        # A width fit for the teacher's decoder is not the student's: the student's own default.
        "decoder_channels": None if cfg.model.arch != arch else cfg.model.decoder_channels})})
    plugin = TeacherDistillation(teacher_model, temperature=temperature, weight=weight,
                                 channel_weight=channel_weight, channel_temperature=channel_temperature,
                                 record={"distilled_from": str(teacher_dir), "kd_temperature": temperature,
                                         "kd_weight": weight, "kd_channel_weight": channel_weight})
    return train(cfg, out, resume=resume, overwrite=overwrite, progress=progress, plugins=[plugin],
                 protect=[teacher_dir])


def compress_model(model: str | Path, prune: float, cfg: RunConfig, out: str | Path, *,
                   prune_decoder: float | None = None, temperature: float = 1.0, weight: float = 1.0, channel_weight: float = 0.0,
                   channel_temperature: float = 4.0, resume: bool = False, overwrite: bool = False,
                   progress: bool = True) -> Any:
    """``everseg compress``: prune ``prune`` of ``model``'s channels (``prune_decoder`` of the
    decoder's when given), then fine-tune the pruned model on
    ``cfg``'s data with the unpruned model as its teacher. Pruning is deterministic (weight
    magnitudes), so ``resume`` rebuilds the same pruned model and continues its run."""
    from everseg.deploy.prune import check_ratios, count_macs, prune_channels
    from everseg.learn.run import train
    from everseg.workflows import load_trained_model, resolve_model_dir

    check_distillation_settings(temperature, weight, channel_weight, channel_temperature)
    check_ratios(prune, prune_decoder)
    source_dir = resolve_model_dir(model).resolve()
    claim_run_folder(out, resume=resume, overwrite=overwrite, protect=[source_dir])
    teacher = load_trained_model(source_dir)
    cfg = _with_data(cfg, teacher, source_dir)
    mc = teacher.config
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "arch": mc.arch, "backbone": mc.backbone, "output_stride": mc.output_stride,
        "decoder_channels": mc.decoder_channels, "pretrained": False, "init_from": None})})
    student = prune_channels(copy.deepcopy(teacher), prune, decoder_ratio=prune_decoder)
    before, after = count_macs(teacher), count_macs(student)
    params = (sum(p.numel() for p in teacher.parameters()), sum(p.numel() for p in student.parameters()))
    shares = f"{100 * prune:.0f} %" + ("" if prune_decoder is None else f" (decoder {100 * prune_decoder:.0f} %)")
    log.info("pruned %s of the channels of %s: %.2f -> %.2f GMACs at 360x480 (%.2fx fewer), "
             "%.2f -> %.2f M parameters", shares, source_dir, before / 1e9, after / 1e9, before / after,
             params[0] / 1e6, params[1] / 1e6)
    student.metadata = {k: v for k, v in (teacher.metadata or {}).items() if k == "class_fractions"}
    plugin = TeacherDistillation(teacher, temperature=temperature, weight=weight,
                                 channel_weight=channel_weight, channel_temperature=channel_temperature,
                                 record={"pruned_from": str(source_dir), "prune_ratio": prune, "prune_decoder_ratio": prune_decoder,
                                         "macs_before": before, "macs_after": after, "kd_temperature": temperature,
                                         "kd_weight": weight, "kd_channel_weight": channel_weight})
    return train(cfg, out, resume=resume, overwrite=overwrite, progress=progress, plugins=[plugin],
                 model=student, protect=[source_dir])


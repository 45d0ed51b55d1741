"""Run a scenario: train every step with a strategy, test after each, keep the lineage.

Each step ``t`` writes ``<out>/step<t>/`` (the Trainer's run folder, with the step's
model in ``model/``); the model of step ``t`` starts as a copy of step ``t-1``'s, its
classifier grown for the new classes. ``<out>/results.json`` / ``results.md`` /
``iou_across_steps.png`` hold the continual metrics (:mod:`everseg.evaluate.continual`).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from everseg.data.scenarios import Scenario, ScenarioSpec, Step
from everseg.devices import choose_precision, resolve_device
from everseg.evaluate.continual import ContinualReport, StepRecord
from everseg.learn.config import RunConfig
from everseg.learn.memory import ReplayMemory
from everseg.learn.rundir import claim_run_folder, clear_run_folder
from everseg.learn.run import finetune_plugins, training_augmentation
from everseg.learn.strategies import Strategy, build_strategies
from everseg.learn.strategies.base import ContinualContext
from everseg.learn.trainer import Trainer

log = logging.getLogger(__name__)

# A later step's default budget: a tenth of the wall time the base took to learn (step 0 here,
# or the base model's own training), and never less than a minute. An incremental step that
# costs as much as retraining has no point.
STEP_SHARE = 0.1
MIN_STEP_MINUTES = 1.0


def default_step_minutes(reference_seconds: float) -> float:
    return max(MIN_STEP_MINUTES, STEP_SHARE * reference_seconds / 60)


def _frozen_copy(model: nn.Module) -> nn.Module:
    old = copy.deepcopy(model).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


def _new_model(cfg: RunConfig, step: Step) -> nn.Module:
    from everseg.models import create_model

    mc = cfg.model
    return create_model(arch=mc.arch, backbone=mc.backbone, label_space=step.label_space,
                        pretrained=mc.pretrained, output_stride=mc.output_stride, dropout=mc.dropout,
                        decoder_channels=mc.decoder_channels)


def evaluate_step(model: nn.Module, step: Step, bf16: bool) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """IoU of every scored class on the whole test set, and mIoU per test view.

    Domain scenarios split the test set into one view per domain; the class IoUs then come
    from the views' summed confusion matrices, i.e. from every test image, not from the
    first domain alone.
    """
    from everseg.evaluate import evaluate
    from everseg.evaluate.metrics import SegmentationMetrics

    domain_miou: dict[str, float | None] = {}
    names = step.label_space.names
    scored = list(step.scored_ids) or list(range(len(names)))

    def scored_iou(iou) -> dict[str, float | None]:
        return {names[i]: (None if iou[i] != iou[i] else float(iou[i])) for i in scored}

    total = None
    for view_name, view in step.tests.items():
        metrics = evaluate(model, view, autocast_bf16=bf16, channels_last=True, progress=False).metrics
        vals = [v for v in scored_iou(metrics.iou).values() if v is not None]
        domain_miou[view_name] = sum(vals) / len(vals) if vals else None
        total = metrics.confusion.copy() if total is None else total + metrics.confusion
    class_iou = scored_iou(SegmentationMetrics.from_confusion(total).iou) if total is not None else {}
    return class_iou, domain_miou


def untrained_domain_miou(scenario: Scenario, cfg: RunConfig, bf16: bool = False) -> dict[str, float | None]:
    """Test mIoU per domain of the model step 0 starts from, before any training: the
    reference of forward transfer. Seeded like step 0, so its random head is step 0's."""
    step = scenario.steps[0]
    torch.manual_seed(cfg.train.seed)
    return evaluate_step(_new_model(cfg, step), step, bf16)[1]


def run_scenario(scenario: Scenario, strategy: str | Sequence[Strategy], cfg: RunConfig, out_dir: str | Path, *,
                 step_epochs: int | None = None, step_minutes: float | None = None,
                 base_model: str | Path | None = None, params: Mapping[str, Any] | None = None,
                 memory_size: int = 20, memory_policy: str = "class_balanced",
                 memory: ReplayMemory | None = None, overwrite: bool = False, name: str | None = None,
                 progress: bool = True) -> ContinualReport:
    """Train and test every step of ``scenario``; ``strategy`` is e.g. ``"mib"`` or ``"plop+replay"``.

    ``cfg`` gives the model, optimiser and augmentation; step 0 trains ``cfg.train.epochs``
    epochs, later steps ``step_epochs`` (default: the same) within ``step_minutes`` of wall
    time each (the LR schedule decays within it, so a short budget is a short schedule, not a
    truncated one). With neither given, a later step gets a tenth of the time the base took to
    learn (step 0's, or what ``base_model`` records), at least a minute
    (:func:`default_step_minutes`); without such a record, ``cfg.train.max_minutes``. The budget is the whole step's:
    the strategies' set-up counts against it, and their wrap-up after training (importance
    passes, memory update) is reserved from it as much as the previous step's took. ``joint``
    retrains every step with step 0's epochs and budget. ``base_model`` is a model folder that
    already learned step 0 (its classes must be step 0's): step 0 is then evaluated, not
    trained, so strategies can share one base. ``params`` sets strategy
    hyper-parameters by name, e.g. ``{"plop.pod_weight": 0.02}``.

    ``memory``: the replay memory to start from (default: the base model's stored one, else
    a new one that a base model's step 0 fills from step 0's images). ``out_dir`` must be
    new or empty, or hold a run and ``overwrite`` be set; it must not hold ``base_model``.
    ``name``: the strategy's name in the report (default: from ``strategy``).
    """
    from everseg.models import load_model, save_model

    from everseg.learn.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ValueError("learn and scenario run train in one process for now: run them without torchrun "
                         "(everseg train is the command that runs data-parallel)")
    out = Path(out_dir)
    device = resolve_device(cfg.train.device)  # a missing GPU is refused before the run folder is touched
    base_model = None if base_model is None else Path(base_model).resolve()
    clear = claim_run_folder(out, overwrite=overwrite, protect=[base_model] if base_model else ())
    if name is None:
        name = strategy if isinstance(strategy, str) else "+".join(s.name for s in strategy)
    strategies = build_strategies(strategy, params) if isinstance(strategy, str) else list(strategy)
    joint = name == "joint"
    fill_from_step0 = False
    if memory is None and any(s.uses_memory for s in strategies):
        stored = None if base_model is None else base_model / "memory"
        if stored is not None and (stored / "memory.json").is_file():
            memory = ReplayMemory.load(stored)  # the base model's own memory: replay what it learned from
            memory.budget = memory_size
        else:
            memory = ReplayMemory(memory_size, policy=memory_policy, seed=cfg.train.seed)
            fill_from_step0 = True
    if clear:
        clear_run_folder(out)
    head_init = "background" if any(s.head_init == "background" for s in strategies) else "random"
    bf16 = choose_precision(device, cfg.train.bf16).dtype == torch.bfloat16
    augment = training_augmentation(cfg)

    sc_kind = scenario.spec.kind
    final_ls = scenario.final_label_space
    scored = [final_ls.names[i] for i in scenario.steps[-1].scored_ids]
    report = ContinualReport(scenario=scenario.spec.name, strategy=name, kind=sc_kind, classes=scored,
                             taught_at={c: final_ls.taught_at[final_ls.index(c)] for c in scored},
                             domains=list(scenario.steps[0].tests) if sc_kind == "domain" else [])
    if sc_kind == "domain":
        groups = {d: scenario.spec.test_domains.get(d) for d in report.domains}
        report.learned_at = {d: next((k for k, st in enumerate(scenario.spec.steps) if st.images == g), 0)
                             for d, g in groups.items()}
    model: nn.Module | None = None
    parent_dir: str | None = None
    # What the last step spent after training (strategies' end_step, memory update): reserved
    # from the next step's training budget, so that a whole step stays within step_minutes.
    wrap_up = 0.0
    reference: float | None = None  # seconds the base took to learn: the default budget of later steps
    for step in scenario.steps:
        t = step.index
        step_dir = out / f"step{t}"
        later = t > 0 and not joint
        epochs = step_epochs if later and step_epochs is not None else cfg.train.epochs
        budget = step_minutes
        if later and budget is None and step_epochs is None and reference:
            budget = default_step_minutes(reference)
            if t == 1:
                log.info("each later step trains within %.1f minutes, a tenth of the %.1f the base took to learn "
                         "(--step-minutes or --step-epochs to choose)", budget, reference / 60)
        if later and budget is not None:
            minutes = max(budget / 2, budget - wrap_up / 60)
        else:
            minutes = cfg.train.max_minutes
        step_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs,
                                                                                "max_minutes": minutes})})
        old_model = None if model is None else _frozen_copy(model)
        if t == 0 and sc_kind == "domain" and base_model is None:
            report.initial_domain_miou = untrained_domain_miou(scenario, cfg, bf16)
        if t == 0 and base_model is not None:
            model = load_model(base_model)
            reference = (getattr(model, "metadata", None) or {}).get("train_seconds")
            if model.label_space.names != step.label_space.names:
                raise ValueError(f"{base_model}: its classes {list(model.label_space.names)} are not step 0's "
                                 f"{list(step.label_space.names)}")
            seconds, seen = 0.0, 0
            if fill_from_step0:
                # A base trained without a memory: fill it from the images the base learned from,
                # which a scenario has in its step 0 (``learn`` passes the memory it found instead).
                memory.update(step.train, step=0)
        else:
            # Seeded before the model is built: a new head's initial weights are part of the run.
            torch.manual_seed(cfg.train.seed + t)
            if joint or model is None:
                model = _new_model(cfg, step)  # joint retrains from the pretrained backbone each step
            elif step.label_space.num_classes > model.num_classes:
                model = copy.deepcopy(model)
                model.grow_classifier(step.label_space, init=head_init)
            else:
                model = copy.deepcopy(model)
            data = step.joint_train if joint else step.train
            ctx = ContinualContext(step=step, step_index=t, old_model=None if joint else old_model,
                                   old_num_classes=0 if old_model is None else old_model.num_classes,
                                   memory=memory)
            active = [] if joint else strategies
            start = time.perf_counter()  # the step's cost: strategy set-up and wrap-up included
            for s in active:
                s.begin_step(ctx)
            trainer = Trainer(model, data.with_transform(augment), None, step_cfg, step_dir,
                              plugins=[*finetune_plugins(cfg), *active], progress=progress)
            # The strategies' set-up is part of what the step costs: it counts against its budget.
            trainer.train_seconds = time.perf_counter() - start
            fit = trainer.fit()
            wrap_start = time.perf_counter()
            for s in active:
                s.end_step(ctx, trainer)
            if memory is not None:
                memory.update(step.train, step=t)
            wrap_up = time.perf_counter() - wrap_start
            seconds, seen = time.perf_counter() - start, fit.images_seen
            if t == 0 or joint:
                reference = seconds
        if t == 0 and base_model is not None:
            model_dir = base_model  # learned elsewhere: the base itself is the parent of step 1
        else:
            parent_meta = dict(getattr(old_model, "metadata", None) or {}) if old_model is not None else {}
            lineage = list(parent_meta.get("lineage", [])) + ([parent_dir] if parent_dir else [])
            # train_seconds stays what learning the base took: a later ``learn`` budgets from it.
            model.metadata = {**getattr(model, "metadata", {}), "scenario": scenario.spec.name, "strategy": name,
                              "step": t, "parent": parent_dir, "lineage": lineage, "step_seconds": seconds,
                              **({"train_seconds": reference} if reference else {})}
            model_dir = step_dir / "model"
            save_model(model, model_dir)
            if memory is not None:
                memory.save(model_dir / "memory")  # travels with the model it belongs to
        parent_dir = str(model_dir.resolve())  # absolute: the lineage must not depend on the current folder
        class_iou, domain_miou = evaluate_step(model, step, bf16)
        names = step.label_space.names
        report.steps.append(StepRecord(
            step=t, name=step.name, seconds=seconds, images_seen=seen, class_iou=class_iou,
            old_classes=[names[i] for i in step.old_ids], new_classes=[names[i] for i in step.new_ids],
            domain_miou=domain_miou if sc_kind == "domain" else {}))
        report.save(out)
    # The last step's model is the run's model: ``--model OUT`` finds it like a training run's.
    save_model(model, out / "model")
    if memory is not None:
        memory.save(out / "model" / "memory")
    return report


def class_incremental_spec(model_names: Sequence[str], new_classes: Sequence[str], *, setting: str = "overlap",
                           name: str = "learn") -> "ScenarioSpec":
    """Two steps: what a model with a background class knows, then ``new_classes``."""
    from everseg.data.scenarios import BACKGROUND, ScenarioSpec, StepSpec

    if not model_names or model_names[0].lower() != BACKGROUND:
        raise ValueError("teaching new classes needs a model with a 'background' class 0 (one trained with "
                         "`everseg scenario run` or `everseg learn`): with the background shift, pixels of "
                         "classes the new data does not label become background")
    clash = [c for c in new_classes if c in model_names]
    if clash:
        raise ValueError(f"the model already knows {clash}")
    return ScenarioSpec(name, "class", (StepSpec(tuple(model_names[1:]), setting=setting),
                                        StepSpec(tuple(new_classes), setting=setting)))


def domain_spec(name: str = "learn") -> "ScenarioSpec":
    """Two steps over the same classes: what the model learned, then the new data."""
    from everseg.data.scenarios import ScenarioSpec, StepSpec

    return ScenarioSpec(name, "domain", (StepSpec(name="base"), StepSpec(name="new data")))

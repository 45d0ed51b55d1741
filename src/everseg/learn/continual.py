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
from everseg.learn.config import RunConfig, load_config
from everseg.learn.rundir import claim_run_folder, clear_run_folder
from everseg.learn.run import aspp_rates, finetune_plugins, training_augmentation
from everseg.learn.strategies import Strategy, build_strategies, with_memory_size
from everseg.learn.strategies.base import ContinualContext, RunStart
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
                        decoder_channels=mc.decoder_channels, aspp_rates=aspp_rates(cfg))


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

    from everseg.learn.distributed import current_world

    world = current_world()
    total = None
    for view_name, view in step.tests.items():
        if world is not None:  # under torchrun each process scores its share; evaluate sums the counts
            view = view.subset(list(range(world.rank, len(view), world.size)))
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
                 memory_size: int | None = None, overwrite: bool = False, resume: bool = False,
                 name: str | None = None, progress: bool = True) -> ContinualReport:
    """Train and test every step of ``scenario``; ``strategy`` is e.g. ``"mib"`` or ``"plop+replay"``
    (or the strategies themselves, e.g. a Replay whose ``memory`` the caller filled).

    ``cfg`` gives the model, optimiser and augmentation; step 0 trains ``cfg.train.epochs``
    epochs, later steps ``step_epochs`` (default: the same) within ``step_minutes`` of wall
    time each (the LR schedule decays within it, so a short budget is a short schedule, not a
    truncated one). With neither given, a later step gets a tenth of the time the base took to
    learn (step 0's, or what ``base_model`` records), at least a minute
    (:func:`default_step_minutes`); without such a record, ``cfg.train.max_minutes``. The budget is the whole step's:
    the strategies' set-up counts against it, and their wrap-up after training (importance
    passes, memory update) is reserved from it as much as the previous step's took. A
    strategy that ``retrains`` (joint) trains every step with step 0's epochs and budget.
    ``base_model`` is a model folder that already learned step 0 (its classes must be step 0's):
    step 0 is then evaluated, not trained, so strategies can share one base. ``params`` sets
    strategy hyper-parameters by name, e.g. ``{"plop.pod_weight": 0.02}``; ``memory_size`` is
    replay's ``replay.memory_size`` when the strategy replays.

    The strategies keep their own state across steps (replay its memory:
    :mod:`everseg.learn.strategies.base` lists the hooks). ``out_dir`` must be new or empty,
    or hold a run and ``overwrite`` be set; it must not hold ``base_model``. ``resume``: go on
    with the interrupted run in ``out_dir`` (the same scenario and strategy): finished steps are
    kept, the interrupted one continues from its last checkpoint with its own config. Strategies
    start again from the last finished step's model folder as from a base model (replay from the
    memory saved there; EWC and MAS measure importance on it again). ``name``: the strategy's
    name in the report (default: from ``strategy``).
    """
    from everseg.learn import distributed

    out = Path(out_dir)
    device = resolve_device(cfg.train.device)  # a missing GPU is refused before the run folder is touched
    world = distributed.init_from_environment(cfg.train.device)
    try:
        return _run_steps(scenario, strategy, cfg, out, device, world, step_epochs=step_epochs,
                          step_minutes=step_minutes, base_model=base_model, params=params,
                          memory_size=memory_size, overwrite=overwrite, resume=resume, name=name,
                          progress=progress)
    finally:
        if world is not None:
            distributed.shutdown()


def _run_steps(scenario: Scenario, strategy: str | Sequence[Strategy], cfg: RunConfig, out: Path,
               device: torch.device, world, *, step_epochs: int | None, step_minutes: float | None,
               base_model: str | Path | None, params: Mapping[str, Any] | None, memory_size: int | None,
               overwrite: bool, resume: bool, name: str | None, progress: bool) -> ContinualReport:
    """run_scenario's steps. Under torchrun every process trains and tests every step on its
    share of the data (the Trainer's DDP; the test counts summed), and process 0 alone writes."""
    from everseg.learn import distributed

    main = world is None or world.main
    base_model = None if base_model is None else Path(base_model).resolve()
    if name is None:
        name = strategy if isinstance(strategy, str) else "+".join(s.name for s in strategy)
    done = _finished_steps(out, scenario, name, base_model, overwrite) if resume else []
    # Process 0 alone judges and clears the folder: the others would see its files appear.
    clear = (claim_run_folder(out, overwrite=overwrite, protect=[base_model] if base_model else ())
             if main and not resume else False)
    strategies = (build_strategies(strategy, with_memory_size(strategy, params, memory_size))
                  if isinstance(strategy, str) else list(strategy))
    retrains = any(s.retrains for s in strategies)
    # A resumed run continues from its last finished step as from a base model.
    start_from = _step_model_dir(out, done[-1].step, base_model) if done else base_model
    for s in strategies:
        s.begin_run(RunStart(base_model=start_from, seed=cfg.train.seed))
    if clear:
        clear_run_folder(out)
    distributed.barrier()
    bf16 = choose_precision(device, cfg.train.bf16).dtype == torch.bfloat16
    report = _new_report(scenario, name)
    if done:
        report.initial_domain_miou = ContinualReport.load(out).initial_domain_miou
    model: nn.Module | None = None
    parent_dir: str | None = None
    # What the last step spent after training (strategies' end_step): reserved from the next
    # step's training budget, so that a whole step stays within step_minutes.
    wrap_up = 0.0
    reference: float | None = None  # seconds the base took to learn: the default budget of later steps
    augment = training_augmentation(cfg)
    for step in scenario.steps:
        t = step.index
        previous = model
        old_model = None if previous is None or retrains else _frozen_copy(previous)
        ctx = ContinualContext(step=step, step_index=t, old_model=old_model,
                               old_num_classes=0 if old_model is None else old_model.num_classes)
        if t < len(done):  # finished before the run was interrupted
            model_dir = _step_model_dir(out, t, base_model)
            model = _load_base(model_dir, step)
            reference = (getattr(model, "metadata", None) or {}).get("train_seconds")
            parent_dir = str(model_dir.resolve())
            report.steps.append(done[t])
            continue
        if t == 0 and scenario.spec.kind == "domain" and base_model is None:
            report.initial_domain_miou = untrained_domain_miou(scenario, cfg, bf16)
        if t == 0 and base_model is not None:
            model = _load_base(base_model, step)
            reference = (getattr(model, "metadata", None) or {}).get("train_seconds")
            for s in strategies:
                s.learned_elsewhere(ctx)
            seconds, seen = 0.0, 0
            model_dir = base_model  # learned elsewhere: the base itself is the parent of step 1
        else:
            later = t > 0 and not retrains
            # Budgets come from clocks: process 0's, so that every process trains the same schedule.
            reference = distributed.from_main(reference or 0.0) or None
            wrap_up = distributed.from_main(wrap_up)
            step_cfg = _step_config(cfg, later, step_epochs, step_minutes, reference, wrap_up, t)
            interrupted = resume and (out / f"step{t}" / "checkpoint.pt").is_file()
            if interrupted:
                # The step goes on as it began: its own config (the budget it was given) is the one.
                step_cfg = load_config(out / f"step{t}" / "config.yaml", {})
            # Seeded before the model is built: a new head's initial weights are part of the run.
            torch.manual_seed(cfg.train.seed + t)
            model = _step_model(cfg, step, None if retrains else previous, strategies)
            data = step.joint_train if retrains else step.train
            start = time.perf_counter()  # the step's cost: strategy set-up and wrap-up included
            for s in strategies:
                s.begin_step(ctx)
            trainer = Trainer(model, data.with_transform(augment), None, step_cfg,
                              out / f"step{t}", plugins=[*finetune_plugins(step_cfg), *strategies], progress=progress,
                              budget_spent=time.perf_counter() - start)
            fit = trainer.fit(resume=interrupted)
            wrap_start = time.perf_counter()
            for s in strategies:
                s.end_step(ctx, trainer)
            # Beyond what the strategies announced (their wrap-up images): the Trainer keeps time
            # for that part itself.
            wrap_up = max(0.0, time.perf_counter() - wrap_start - trainer.wrap_up_estimate)
            seconds, seen = time.perf_counter() - start, fit.images_seen
            if t == 0 or retrains:
                reference = seconds
            model_dir = out / f"step{t}" / "model"
            if main:
                _save_step_model(model, model_dir, strategies, previous, {
                    "scenario": scenario.spec.name, "strategy": name, "step": t, "parent": parent_dir,
                    "step_seconds": seconds, **({"train_seconds": reference} if reference else {})})
        parent_dir = str(model_dir.resolve())  # absolute: the lineage must not depend on the current folder
        class_iou, domain_miou = evaluate_step(model, step, bf16)
        names = step.label_space.names
        report.steps.append(StepRecord(
            step=t, name=step.name, seconds=seconds, images_seen=seen, class_iou=class_iou,
            old_classes=[names[i] for i in step.old_ids], new_classes=[names[i] for i in step.new_ids],
            domain_miou=domain_miou if scenario.spec.kind == "domain" else {}))
        if main:
            report.save(out)
        distributed.barrier()
    if main:
        # The last step's model is the run's model: ``--model OUT`` finds it like a training run's.
        _save_step_model(model, out / "model", strategies)
    return report


def _step_model_dir(out: Path, t: int, base_model: Path | None) -> Path:
    return base_model if t == 0 and base_model is not None else out / f"step{t}" / "model"


def _finished_steps(out: Path, scenario: Scenario, name: str, base_model: Path | None,
                    overwrite: bool) -> list[StepRecord]:
    """The steps an interrupted run in ``out`` finished (recorded, their model saved); refuses a
    folder that holds no run of this scenario and strategy."""
    from everseg.learn.rundir import RunFolderError

    if overwrite:
        raise RunFolderError("--resume continues the run in --out and --overwrite replaces it: give one")
    if not (out / "results.json").is_file():
        if (out / "step0" / "checkpoint.pt").is_file():
            return []  # interrupted in its first step
        raise RunFolderError(f"--out {out} holds no interrupted scenario run to resume (no results.json or "
                             "step0/checkpoint.pt)")
    done = ContinualReport.load(out)
    if done.scenario != scenario.spec.name or done.strategy != name:
        raise RunFolderError(f"--out {out} holds a run of {done.scenario!r} with {done.strategy!r}, not "
                             f"{scenario.spec.name!r} with {name!r}: resume it with the same scenario and strategy")
    # A step is recorded after its model is saved: a recorded step is a finished one.
    return [r for k, r in enumerate(done.steps) if r.step == k
            and (_step_model_dir(out, k, base_model) / "config.json").is_file()]


def _new_report(scenario: Scenario, name: str) -> ContinualReport:
    kind, final_ls = scenario.spec.kind, scenario.final_label_space
    scored = [final_ls.names[i] for i in scenario.steps[-1].scored_ids]
    report = ContinualReport(scenario=scenario.spec.name, strategy=name, kind=kind, classes=scored,
                             taught_at={c: final_ls.taught_at[final_ls.index(c)] for c in scored},
                             domains=list(scenario.steps[0].tests) if kind == "domain" else [])
    if kind == "domain":
        groups = {d: scenario.spec.test_domains.get(d) for d in report.domains}
        report.learned_at = {d: next((k for k, st in enumerate(scenario.spec.steps) if st.images == g), 0)
                             for d, g in groups.items()}
    return report


def _step_config(cfg: RunConfig, later: bool, step_epochs: int | None, step_minutes: float | None,
                 reference: float | None, wrap_up: float, t: int) -> RunConfig:
    """The step's epochs, time budget, LR and what of the backbone trains: step 0's for step 0
    (and every step of a retraining strategy), else the later steps' budget less the previous
    step's wrap-up, their LR (the backbone's included) and their fine-tuning mode. Later steps
    train no auxiliary head (loss.aux_weight): a new, untrained one in a step a tenth of the
    base's length would pull at the backbone the old classes rest on."""
    epochs = step_epochs if later and step_epochs is not None else cfg.train.epochs
    budget = step_minutes
    if later and budget is None and step_epochs is None and reference:
        budget = default_step_minutes(reference)
        if t == 1:
            log.info("each later step trains within %.1f minutes, a tenth of the %.1f the base took to learn "
                     "(--step-minutes or --step-epochs to choose)", budget, reference / 60)
    minutes = max(budget / 2, budget - wrap_up / 60) if later and budget is not None else cfg.train.max_minutes
    lr = cfg.optim.lr * cfg.optim.incremental_lr_factor if later else cfg.optim.lr
    finetune = cfg.train.incremental_finetune if later else cfg.train.finetune
    optim = {"lr": lr}
    if later and cfg.optim.incremental_backbone_lr_factor is not None:
        optim["backbone_lr_factor"] = cfg.optim.incremental_backbone_lr_factor
    update = {"train": cfg.train.model_copy(update={"epochs": epochs, "max_minutes": minutes, "finetune": finetune}),
              "optim": cfg.optim.model_copy(update=optim)}
    if later:
        update["loss"] = cfg.loss.model_copy(update={"aux_weight": 0.0})
    return cfg.model_copy(update=update)


def _load_base(base_model: Path, step: Step) -> nn.Module:
    from everseg.models import load_model

    model = load_model(base_model)
    if model.label_space.names != step.label_space.names:
        raise ValueError(f"{base_model}: its classes {list(model.label_space.names)} are not step 0's "
                         f"{list(step.label_space.names)}")
    return model


def _step_model(cfg: RunConfig, step: Step, previous: nn.Module | None, strategies: Sequence[Strategy]) -> nn.Module:
    """A copy of the previous step's model, its classifier grown for the step's new classes;
    a new model from the pretrained backbone at step 0 (and every step of joint)."""
    if previous is None:
        return _new_model(cfg, step)
    model = copy.deepcopy(previous)
    # What of it trains is this step's choice (its train.finetune), not what the previous step's
    # fine-tuning mode left frozen: the step's plugins freeze from a fully trainable model.
    model.freeze_backbone(False)
    for p in model.parameters():
        p.requires_grad_(True)
    if step.label_space.num_classes > model.num_classes:
        head_init = "background" if any(s.head_init == "background" for s in strategies) else "random"
        model.grow_classifier(step.label_space, init=head_init)
    return model


def _save_step_model(model: nn.Module, model_dir: Path, strategies: Sequence[Strategy],
                     parent: nn.Module | None = None, record: Mapping[str, Any] | None = None) -> None:
    """Save the model with its lineage (``record``: what the step was), and beside it what the
    strategies keep for a run that continues from it."""
    from everseg.models import save_model

    if record is not None:
        parent_meta = dict(getattr(parent, "metadata", None) or {})
        lineage = list(parent_meta.get("lineage", [])) + ([record["parent"]] if record.get("parent") else [])
        # train_seconds stays what learning the base took: a later ``learn`` budgets from it.
        model.metadata = {**getattr(model, "metadata", {}), **record, "lineage": lineage}
    save_model(model, model_dir)
    for s in strategies:
        s.save(model_dir)


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

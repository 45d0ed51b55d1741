"""``everseg tune``: search a recipe's hyper-parameters with Optuna, every trial a real training run.

A trial is ``everseg train`` with some config fields set by the sampler (TPE by default,
random or grid on request) and its own time budget; the score is the trial's best
validation mIoU. The first trial is the given config itself when the space holds its
values, so the study measures its starting point. Bad trials stop early: a Trainer plugin reports each validation to Optuna
and asks the loop to stop when the pruner (median by default, or Hyperband) says the trial
cannot catch up. The study lives in the output folder: an SQLite database by default, or a
journal file (``journal=True``) that several workers on one file system can share. After
``kill -9`` the same command with ``resume=True`` continues: finished trials are kept and
only the trial that was running is lost (it is marked failed, its process being gone).

The output folder holds ``study.db`` (or ``study.journal``), ``trials/NNNN/`` (each trial's
run folder), ``best.yaml`` (the given config with the best trial's values: ``everseg train
--config best.yaml`` takes it unchanged), ``trials.csv`` and ``trials.md``, and the plots
``history.png`` and ``importance.png``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import socket
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from everseg.atomic import atomic_write_text
from everseg.learn.config import RunConfig, config_value, load_config
from everseg.learn.plugins import Plugin

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
STUDY_NAME = "everseg"


@dataclass(frozen=True)
class Param:
    """One searched config field: a range (``low``..``high``) or ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.choices:
            # Optuna's choices must be scalars; lists (crop sizes) travel as their JSON text.
            picked = trial.suggest_categorical(self.name, [json.dumps(c) for c in self.choices])
            return json.loads(picked)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def encode(self, value: Any) -> Any | None:
        """``value`` as this parameter stores it in the study, or None when the space cannot give it."""
        if self.choices:
            value = list(value) if isinstance(value, tuple) else value
            # By value, not text: the config holds warmup_epochs 1.0 where the space says 1.
            return next((json.dumps(c) for c in self.choices if c == value), None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return None
        return int(value) if self.integer else float(value)

    def values(self) -> list[Any]:
        """Values that must all be valid config values: the ends of a range, or every choice."""
        return list(self.choices) if self.choices else [self.low, self.high]


def default_space_path() -> Path:
    return Path(str(resources.files("everseg.learn") / "tune_space.yaml"))


def load_space(path: str | Path | None = None) -> list[Param]:
    """The search space in ``path`` (default: the shipped CamVid space), each entry checked."""
    path = Path(path) if path is not None else default_space_path()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--space {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--space {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--space {path}: expected a mapping of config fields to ranges or choices")
    params = []
    for name, spec in raw.items():
        where = f"--space {path}: {name}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: give {{low: .., high: ..}} or {{choices: [..]}}, not {spec!r}")
        unknown = set(spec) - {"low", "high", "log", "choices"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; use low, high, log or choices")
        if "choices" in spec:
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices or set(spec) - {"choices"}:
                raise ValueError(f"{where}: choices must be a non-empty list, alone")
            params.append(Param(str(name), choices=tuple(choices)))
            continue
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
            raise ValueError(f"{where}: low and high must both be numbers")
        if not low < high:
            raise ValueError(f"{where}: low ({low}) must be below high ({high})")
        use_log = bool(spec.get("log", False))
        if use_log and low <= 0:
            raise ValueError(f"{where}: a log scale needs low > 0")
        params.append(Param(str(name), float(low), float(high), use_log,
                            integer=isinstance(low, int) and isinstance(high, int)))
    return params


def _check_space_fits(params: Sequence[Param], config: str | Path | None, overrides: dict[str, Any],
                      space_name: str) -> None:
    """Every value the space can give must make a valid config (unknown fields, bad ranges)."""
    for p in params:
        for value in p.values():
            try:
                load_config(config, {**overrides, p.name: value}, labels={p.name: f"--space {space_name}: {p.name}"})
            except ValueError as exc:
                raise ValueError(str(exc).splitlines()[0]) from None


class ReportToOptuna(Plugin):
    """Reports each validation mIoU to the trial and stops the run when the pruner says so."""

    def __init__(self, trial):
        self.trial = trial
        self.pruned = False

    def on_validation(self, trainer, metrics) -> None:
        self.trial.report(metrics.miou, trainer.epoch)
        if self.trial.should_prune():
            self.pruned = True
            trainer.request_stop()


@dataclass
class TuneReport:
    out: Path
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def _storage(out: Path, journal: bool):
    import optuna

    if journal:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")


def _sampler(name: str, params: Sequence[Param], seed: int):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    ranges = [p.name for p in params if not p.choices]
    if ranges:
        raise ValueError(f"--sampler grid needs choices for every field; {', '.join(ranges)} "
                         f"{'is a range' if len(ranges) == 1 else 'are ranges'}")
    return optuna.samplers.GridSampler({p.name: [json.dumps(c) for c in p.choices] for p in params}, seed=seed)


def _pruner(name: str, epochs: int):
    import optuna

    if name == "median":
        # Two finished trials before any is judged, and never on its first validation.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, epochs))
    return optuna.pruners.NopPruner()


def _fail_orphans(study) -> int:
    """Mark failed the trials left running by a process of this machine that no longer exists
    (a ``kill -9``); trials of live workers, here or elsewhere, are left alone."""
    from optuna.trial import TrialState

    failed = 0
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid, where = t.user_attrs.get("pid"), t.user_attrs.get("host")
        if where != host or pid is None:
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        failed += 1
    return failed


def _starting_point(cfg: RunConfig, params: Sequence[Param]) -> dict[str, Any] | None:
    """The given config's own values of the searched fields, when the space holds them all: the
    study's first trial, so it measures the recipe it starts from and its best is never worse
    at the trial budget."""
    start = {}
    for p in params:
        encoded = p.encode(config_value(cfg, p.name))
        if encoded is None:
            return None
        start[p.name] = encoded
    return start


def _as_trained(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the fields train fits to the data filled in (what a trial without drawn values runs)."""
    from everseg.learn.run import build_datasets, fit_to_data

    if not cfg.data.fit_to_data:
        return cfg
    # Measured from disk: the trials decode (and cache) the images themselves.
    uncached = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache": "none"})})
    return fit_to_data(cfg, build_datasets(uncached)[0])[0]


def _with_validation(cfg: RunConfig) -> dict[str, Any]:
    """Overrides that give a recipe without validation (CamVid's trains on train+val) a split
    to score trials on: train on ``train``, validate on ``val``."""
    dc = cfg.data
    if dc.val_split:
        return {}
    from everseg.data.open import available_splits, dataset_kind

    splits = available_splits(dc.path, dataset_kind(dc.path, dc.dataset))
    if "val" not in splits or "train" not in splits:
        raise ValueError(f"{dc.path}: tuning scores each trial on a validation split, and the config has "
                         f"none (data.val_split) nor does the data have train and val splits; "
                         f"set data.val_split or data.val_fraction")
    log.info("trials train on %s/train and are scored on %s/val (the config trains on %s without validation)",
             dc.path, dc.path, dc.train_split)
    return {"data.train_split": "train", "data.val_split": "val"}


def tune(config: str | Path | None, out: str | Path, *, trials: int, overrides: dict[str, Any] | None = None,
         labels: dict[str, str] | None = None, minutes: float | None = None, space: str | Path | None = None,
         sampler: str = "tpe", pruner: str = "median", journal: bool = False, resume: bool = False,
         seed: int = 0, progress: bool = True) -> TuneReport:
    """Run (or continue) a study of ``trials`` finished trials; see the module's docstring.

    ``overrides``: config fields fixed for every trial (``--data``, ``--set``); ``minutes``:
    each trial's time budget (``train.max_minutes``), so a study costs about ``trials x minutes``.
    """
    import optuna

    from everseg.learn.run import train

    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise ValueError(f"--pruner {pruner!r}: choose from {', '.join(PRUNERS)}")
    if minutes is not None and not 0 < minutes < float("inf"):
        raise ValueError(f"--minutes {minutes}: must be a positive number")
    out = Path(out)
    overrides = dict(overrides or {})
    labels = dict(labels or {})
    base = load_config(config, overrides, labels=labels)
    if base.data.path is None:
        raise ValueError("no dataset path: set data.path in the config or pass --data")
    space_name = str(space) if space is not None else "(default)"
    params = load_space(space)
    fixed = {**overrides, **_with_validation(base)}
    if minutes is not None:
        fixed["train.max_minutes"] = minutes
    _check_space_fits(params, config, fixed, space_name)
    search_sampler = _sampler(sampler, params, seed)
    store = out / ("study.journal" if journal else "study.db")
    if store.exists() and not resume:
        raise ValueError(f"--out {out}: holds a tuning study already; --resume continues it "
                         f"(or choose another --out)")
    if not store.exists() and resume:
        raise ValueError(f"--out {out}: no study to resume ({store.name} is missing)")
    if out.exists() and not store.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: the folder holds other files; tune into a new or empty folder")

    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY_NAME, storage=_storage(out, journal), direction="maximize",
                                sampler=search_sampler, pruner=_pruner(pruner, base.train.epochs),
                                load_if_exists=True)
    if not study.trials and sampler != "grid":
        start = _starting_point(_as_trained(load_config(config, fixed, labels=labels)), params)
        if start is not None:
            study.enqueue_trial(start)
    orphans = _fail_orphans(study)
    if orphans:
        log.info("%d trial(s) left running by a stopped process marked failed", orphans)
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    # A resumed TPE/random sampler must not replay the first run's random draws.
    if resume and sampler != "grid":
        search_sampler = _sampler(sampler, params, seed + len(study.trials))
        study.sampler = search_sampler

    def objective(trial) -> float:
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        chosen = {p.name: p.suggest(trial) for p in params}
        cfg = load_config(config, {**fixed, **chosen}, labels=labels)
        run_dir = out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run", str(run_dir))
        reporter = ReportToOptuna(trial)
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in chosen.items()))
        result = train(cfg, run_dir, overwrite=True, progress=progress, plugins=[reporter])
        trial.set_user_attr("minutes", result.train_seconds / 60)
        trial.set_user_attr("epochs", result.epochs_run)
        if reporter.pruned:
            raise optuna.TrialPruned()
        if result.best_miou is None:
            raise ValueError("the trial had no validation")
        return result.best_miou

    finished = len(study.get_trials(deepcopy=False, states=done_states))
    if finished < trials:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(trials, states=done_states)],
                           catch=(FloatingPointError,), gc_after_trial=True)
    return _write_results(study, out, config, overrides, labels, params)


def _write_results(study, out: Path, config, overrides: dict[str, Any], labels: dict[str, str],
                   params: Sequence[Param]) -> TuneReport:
    from optuna.trial import TrialState

    rows = []
    for t in study.trials:
        row = {"trial": t.number, "state": t.state.name.lower(),
               "val_miou": None if t.value is None else round(t.value, 2),
               "epochs": t.user_attrs.get("epochs"),
               "minutes": None if t.user_attrs.get("minutes") is None else round(t.user_attrs["minutes"], 1)}
        for p in params:
            v = t.params.get(p.name)
            row[p.name] = json.loads(v) if p.choices and v is not None else v
        rows.append(row)
    files: dict[str, Path] = {}
    columns = list(rows[0]) if rows else ["trial"]
    csv_path = out / "trials.csv"
    lines: list[str] = []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    atomic_write_text(csv_path, buf.getvalue())
    files["trials.csv"] = csv_path
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join("" if r[c] is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
                                       for c in columns) + " |")
    atomic_write_text(out / "trials.md", "\n".join(lines) + "\n")
    files["trials.md"] = out / "trials.md"

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    best_params: dict[str, Any] = {}
    if best is not None:
        best_params = {p.name: json.loads(best.params[p.name]) if p.choices else best.params[p.name]
                       for p in params if p.name in best.params}
        # As the trial ran: with the fields train fitted to the data written out, since every
        # field in the file counts as set and would otherwise replay the built-in defaults.
        cfg = _as_trained(load_config(config, {**overrides, **best_params}, labels=labels))
        header = (f"# everseg tune: trial {best.number} of {out}, validation mIoU {best.value:.2f}\n"
                  f"# tuned: {', '.join(f'{k}={v}' for k, v in best_params.items())}\n")
        atomic_write_text(out / "best.yaml", header + cfg.to_yaml())
        files["best.yaml"] = out / "best.yaml"
    files.update(_plots(study, out, len(complete)))
    return TuneReport(out=out, best_value=None if best is None else best.value, best_params=best_params,
                      best_trial=None if best is None else best.number, trials=rows, files=files)


def _plots(study, out: Path, complete: int) -> dict[str, Path]:
    """The optimisation history, and the parameters' importances once there is something to compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    files = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if complete >= 1:
            ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name="validation mIoU")
            ax.figure.savefig(out / "history.png", dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
            files["history.png"] = out / "history.png"
        if complete >= 3:
            try:
                ax = optuna.visualization.matplotlib.plot_param_importances(study, target_name="validation mIoU")
            except (RuntimeError, ValueError, ZeroDivisionError) as exc:  # e.g. every trial drew the same values
                log.info("no importance plot: %s", exc)
            else:
                ax.figure.savefig(out / "importance.png", dpi=100, bbox_inches="tight")
                plt.close(ax.figure)
                files["importance.png"] = out / "importance.png"
    return files

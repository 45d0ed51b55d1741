"""Incremental-learning strategies, by name. Compose them with "+": ``plop+replay``.

Every combination means all of its parts: strategies add loss terms and shape the recipe's
segmentation loss through :class:`~everseg.learn.losses.LossShape`, never replace it
(tests/continual/test_strategy_pairs.py runs every pair).

``finetune`` (train on each step's data alone: the lower bound) and ``joint`` (retrain on all
data so far: the upper bound) are strategies too, used alone: combined with a method, finetune
would add nothing and joint would leave nothing to the method.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

from everseg.learn.strategies.base import ContinualContext, RunStart, Strategy
from everseg.learn.strategies.baselines import Finetune, Joint
from everseg.learn.strategies.distillation import ILT, LwF
from everseg.learn.strategies.ewf import EWF
from everseg.learn.strategies.importance import EWC, MAS, SampleWeighting
from everseg.learn.strategies.mer import MetaExperienceReplay, Reptile
from everseg.learn.strategies.mib import MiB
from everseg.learn.strategies.plop import PLOP
from everseg.learn.strategies.replay import Replay

STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "replay": Replay,
    "ewc": EWC,
    "mas": MAS,
    "weighting": SampleWeighting,
    "lwf": LwF,
    "ilt": ILT,
    "mib": MiB,
    "plop": PLOP,
    "mer": MetaExperienceReplay,
    "reptile": Reptile,
    "ewf": EWF,
}
BASELINES: dict[str, Callable[[], Strategy]] = {"finetune": Finetune, "joint": Joint}


def build_strategies(spec: str, params: Mapping[str, Any] | None = None) -> list[Strategy]:
    """``"plop+replay"`` -> [Replay(), PLOP()].

    ``params`` sets hyper-parameters by ``"strategy.argument"``, e.g. ``{"lwf.weight": 5}``;
    values given as strings (from the command line) are converted to the default's type.
    """
    names = [n.strip().lower() for n in spec.split("+") if n.strip()]
    if not names:
        raise ValueError("empty strategy")
    params = dict(params or {})
    baselines = [n for n in names if n in BASELINES]
    if baselines:
        if len(names) > 1:
            raise ValueError(f"{spec!r}: {baselines[0]} is used alone ("
                             + ("finetune plus a method is that method" if baselines[0] == "finetune"
                                else "joint retrains on all the data, which leaves a method nothing to do") + ")")
        if params:
            raise ValueError(f"{names[0]} has no hyper-parameters (got {sorted(params)})")
        return [BASELINES[names[0]]()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"unknown or repeated strategy in {spec!r}; choose from {sorted(STRATEGIES)} "
                         f"joined with '+', or {' / '.join(BASELINES)} alone")
    if "mer" in names and "replay" in names:
        raise ValueError(f"{spec!r}: mer replays from its own memory already; use mer alone, or reptile+replay "
                         "for meta-updates over replay's batches")
    kwargs: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in params.items():
        owner, _, arg = key.partition(".")
        if owner not in kwargs:
            raise ValueError(f"hyper-parameter {key!r}: {owner!r} is not one of this run's strategies {names}")
        defaults = strategy_parameters(owner)
        if arg not in defaults:
            raise ValueError(f"hyper-parameter {key!r}: {owner} takes {sorted(defaults)}")
        kwargs[owner][arg] = _checked(key, _convert(key, value, defaults[arg]))
    # Replay first, so the others see the replayed images; MER first, so that the others' batch
    # hooks act on each of its steps once.
    names.sort(key=lambda n: n not in ("replay", "mer"))
    return [STRATEGIES[n](**kwargs[n]) for n in names]


def with_memory_size(spec: str, params: Mapping[str, Any] | None, memory_size: int | None) -> dict[str, Any]:
    """``params`` with the memory budget of ``spec``'s replaying strategy (replay or mer) set to
    ``memory_size`` (a ``replay.memory_size`` / ``mer.memory_size`` already in ``params`` wins)."""
    params = dict(params or {})
    for name in [n.strip().lower() for n in spec.split("+")]:
        if memory_size is not None and name in ("replay", "mer"):
            params.setdefault(f"{name}.memory_size", memory_size)
    return params


def default_strategy(adds_classes: bool) -> str:
    """The strategy to use when none is named: the best measured on CamVid (benchmarks/README.md).

    Teaching new classes: MiB. With the default later steps (frozen backbone, 5x the LR; a
    tenth of joint's time each) it kept 1.07x joint's mIoU on camvid-6-5 and 1.09x on camvid-6-1
    and learned the new classes better than the 15-minute joint did (14.6 and 16.9 mIoU against
    9.9); MiB+replay 0.98x and 0.99x (new classes 6.4, 8.8), PLOP 0.98x on camvid-6-5 and
    0.82x on camvid-6-1. New data of the same classes: Reptile+replay, replay with Reptile's
    meta-updates (camvid-domains: 1.11-1.12x joint in three runs, 1.4-3.4 points above replay
    alone each time; MiB's distillation only holds the model back there). Fine-tuning, the
    obvious default, keeps no old class when classes are added.
    """
    return "mib" if adds_classes else "reptile+replay"


def strategy_parameters(name: str) -> dict[str, Any]:
    """The hyper-parameters of strategy ``name`` and their defaults (see each class's docstring)."""
    sig = inspect.signature(STRATEGIES[name])
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def _checked(key: str, value: Any) -> Any:
    # No strategy has a hyper-parameter that means anything negative or infinite (a negative
    # distillation weight rewards forgetting); refused here, before a run starts.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"hyper-parameter {key}={value!r}: must be a finite number >= 0")
    return value


def _convert(key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if isinstance(default, tuple):
            return tuple(type(default[0])(v) for v in value.split(","))
        return type(default)(value)
    except ValueError:
        raise ValueError(f"hyper-parameter {key}={value!r}: expected a {type(default).__name__} "
                         f"like {default!r}") from None


__all__ = ["BASELINES", "EWC", "EWF", "ILT", "MAS", "MiB", "ContinualContext", "Finetune", "Joint", "LwF", "MetaExperienceReplay",
           "PLOP", "Replay", "Reptile", "RunStart", "STRATEGIES", "SampleWeighting", "Strategy", "build_strategies", "default_strategy",
           "strategy_parameters", "with_memory_size"]

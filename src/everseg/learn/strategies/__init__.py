"""Incremental-learning strategies, by name. Compose them with "+": ``plop+replay``.

Every combination means all of its parts: strategies add loss terms and shape the recipe's
segmentation loss through :class:`~everseg.learn.losses.LossShape`, never replace it
(tests/continual/test_strategy_pairs.py runs every pair).

``finetune`` (no strategy: the lower bound) and ``joint`` (retrain on all data so far:
the upper bound) are handled by the continual runner itself.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

from everseg.learn.strategies.base import ContinualContext, Strategy
from everseg.learn.strategies.distillation import ILT, LwF
from everseg.learn.strategies.ewf import EWF
from everseg.learn.strategies.importance import EWC, MAS, SampleWeighting
from everseg.learn.strategies.mer import MetaReplay
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
    "mer": MetaReplay,
    "ewf": EWF,
}
BASELINES = ("finetune", "joint")


def build_strategies(spec: str, params: Mapping[str, Any] | None = None) -> list[Strategy]:
    """``"plop+replay"`` -> [Replay(), PLOP()]. Replay runs first so the others see replayed images.

    ``params`` sets hyper-parameters by ``"strategy.argument"``, e.g. ``{"lwf.weight": 5}``;
    values given as strings (from the command line) are converted to the default's type.
    """
    names = [n.strip().lower() for n in spec.split("+") if n.strip()]
    if not names:
        raise ValueError("empty strategy")
    params = dict(params or {})
    if names in (["finetune"], ["joint"]):
        if params:
            raise ValueError(f"{names[0]} has no hyper-parameters (got {sorted(params)})")
        return []
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"unknown or repeated strategy in {spec!r}; choose from {sorted(STRATEGIES)} "
                         f"joined with '+', or {' / '.join(BASELINES)} alone")
    kwargs: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in params.items():
        owner, _, arg = key.partition(".")
        if owner not in kwargs:
            raise ValueError(f"hyper-parameter {key!r}: {owner!r} is not one of this run's strategies {names}")
        defaults = strategy_parameters(owner)
        if arg not in defaults:
            raise ValueError(f"hyper-parameter {key!r}: {owner} takes {sorted(defaults)}")
        kwargs[owner][arg] = _convert(key, value, defaults[arg])
    names.sort(key=lambda n: n != "replay")
    return [STRATEGIES[n](**kwargs[n]) for n in names]


def default_strategy(adds_classes: bool) -> str:
    """The strategy to use when none is named: the best measured on CamVid (benchmarks/README.md).

    Teaching new classes: MiB, the most consistent. Of joint's mIoU it kept 0.94x and 0.92x on
    camvid-6-5 and 0.93x and 0.93x on camvid-6-1 (the smallest budget and four times it);
    MiB+replay 0.87x, 0.99x, 0.89x and 0.90x. New data of the same classes: replay (camvid-domains:
    1.00x joint, where MiB's distillation only holds the model back: 0.94x). Fine-tuning, the
    obvious default, keeps no old class when classes are added.
    """
    return "mib" if adds_classes else "replay"


def strategy_parameters(name: str) -> dict[str, Any]:
    """The hyper-parameters of strategy ``name`` and their defaults (see each class's docstring)."""
    sig = inspect.signature(STRATEGIES[name])
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


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


__all__ = ["BASELINES", "EWC", "EWF", "ILT", "MAS", "MiB", "ContinualContext", "LwF", "MetaReplay", "PLOP", "Replay",
           "STRATEGIES", "SampleWeighting", "Strategy", "build_strategies", "default_strategy",
           "strategy_parameters"]

"""Incremental-learning strategies, by name. Compose them with "+": ``plop+replay``.

``finetune`` (no strategy: the lower bound) and ``joint`` (retrain on all data so far:
the upper bound) are handled by the continual runner itself.
"""

from __future__ import annotations

from typing import Callable

from everseg.learn.strategies.base import ContinualContext, Strategy
from everseg.learn.strategies.distillation import ILT, LwF
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
}
BASELINES = ("finetune", "joint")


def build_strategies(spec: str) -> list[Strategy]:
    """``"plop+replay"`` -> [Replay(), PLOP()]. Replay runs first so the others see replayed images."""
    names = [n.strip().lower() for n in spec.split("+") if n.strip()]
    if not names:
        raise ValueError("empty strategy")
    if names in (["finetune"], ["joint"]):
        return []
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"unknown or repeated strategy in {spec!r}; choose from {sorted(STRATEGIES)} "
                         f"joined with '+', or {' / '.join(BASELINES)} alone")
    names.sort(key=lambda n: n != "replay")
    return [STRATEGIES[n]() for n in names]


__all__ = ["BASELINES", "EWC", "ILT", "MAS", "MiB", "ContinualContext", "LwF", "MetaReplay", "PLOP", "Replay",
           "STRATEGIES", "SampleWeighting", "Strategy", "build_strategies"]

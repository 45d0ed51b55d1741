"""The two bounds every incremental method is measured between, as strategies like the rest."""

from __future__ import annotations

from everseg.learn.strategies.base import Strategy


class Finetune(Strategy):
    """Train each step on its own data and nothing else: the lower bound (catastrophic forgetting)."""

    name = "finetune"


class Joint(Strategy):
    """Retrain every step from the pretrained backbone on all the data so far, with step 0's
    epochs and budget: the upper bound, at the cost incremental learning exists to avoid."""

    name = "joint"
    retrains = True

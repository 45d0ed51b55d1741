"""Prometheus metrics of the service, in histograms where a distribution is what matters.

Two kinds: what this process sees as it happens (request latency per endpoint, prediction
confidence and class areas, each labelled with the model version that answered), and what
the registry database knows, read at each scrape (feedback by status, update durations,
holdout and feedback mIoU per version, rollbacks, the active version). The second kind is
the same from every replica and survives restarts, since the worker that trains is another
process and the database is where its results are.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Sequence

import numpy as np

from everseg.models.saving import read_model_config
from everseg.models.versions import ModelRegistry
from everseg.serve.feedback import STATUSES, FeedbackStore

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
UPDATE_BUCKETS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0, 60.0, 300.0, 1800.0)
CONFIDENCE_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
AREA_BUCKETS = (0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
FEEDBACK_WINDOW = 50  # feedback mIoU per version: mean of its last this-many scored corrections


class _RegistryCollector:
    """Reads the registry database at scrape time (a prometheus_client custom collector)."""

    def __init__(self, registry: ModelRegistry, store: FeedbackStore):
        self.registry, self.store = registry, store

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        active = self.registry.current
        yield GaugeMetricFamily("everseg_active_version", "The model version serving predictions",
                                value=active if active is not None else 0)
        counts = self.store.counts()
        g = GaugeMetricFamily("everseg_feedback_items", "Feedback items by status", labels=["status"])
        for status in STATUSES:
            g.add_metric([status], counts.get(status, 0))
        yield g
        yield CounterMetricFamily("everseg_feedback_received", "Feedback items received",
                                  value=sum(counts.values()))
        events = self.registry.events()
        c = CounterMetricFamily("everseg_version_changes", "Changes of the active version by kind",
                                labels=["kind"])
        for kind in ("publish", "reject", "activate", "rollback", "auto-rollback"):
            c.add_metric([kind], sum(1 for e in events if e["kind"] == kind))
        yield c
        holdout = GaugeMetricFamily("everseg_holdout_miou", "Holdout mIoU of each version (percent)",
                                    labels=["version", "status"])
        fb = GaugeMetricFamily("everseg_feedback_miou", "Mean mIoU of the version's served predictions against "
                               f"the corrections sent for them (last {FEEDBACK_WINDOW}, percent)",
                               labels=["version"])
        for v in self.registry.versions():
            score = v["info"].get("holdout_miou")
            if score is not None:
                holdout.add_metric([str(v["version"]), v["status"]], float(score))
            scores = self.store.feedback_mious(v["version"], FEEDBACK_WINDOW)
            if scores:
                fb.add_metric([str(v["version"])], float(np.mean(scores)))
        yield holdout
        yield fb
        seconds = [i.seconds for i in self.store.items() if i.seconds is not None]
        yield _histogram(HistogramMetricFamily, "everseg_update_seconds",
                         "Time from taking a feedback item to its accepted or rejected version", seconds,
                         UPDATE_BUCKETS)


def _histogram(family: Any, name: str, doc: str, values: Sequence[float], buckets: Sequence[float]) -> Any:
    values = np.asarray(values, dtype=np.float64)
    cumulative = [(str(b), int((values <= b).sum())) for b in buckets] + [("+Inf", int(values.size))]
    return family(name, doc, buckets=cumulative, sum_value=float(values.sum()))


class ServiceMetrics:
    def __init__(self, registry: ModelRegistry, store: FeedbackStore):
        from prometheus_client import CollectorRegistry, Gauge, Histogram

        self.prom = CollectorRegistry()
        self.requests = Histogram("everseg_request_seconds", "HTTP request latency by endpoint",
                                  ["endpoint", "method", "code", "version"], buckets=LATENCY_BUCKETS,
                                  registry=self.prom)
        self.confidence = Histogram("everseg_prediction_confidence",
                                    "Mean winning-class probability of each prediction", ["version"],
                                    buckets=CONFIDENCE_BUCKETS, registry=self.prom)
        self.areas = Histogram("everseg_predicted_class_fraction",
                               "Share of each prediction's pixels given to each class (drift: compare with "
                               "everseg_training_class_fraction)", ["version", "class"], buckets=AREA_BUCKETS,
                               registry=self.prom)
        self.training_areas = Gauge("everseg_training_class_fraction",
                                    "Share of the labelled training pixels of each class, as the active "
                                    "version's metadata records it", ["class"], registry=self.prom)
        self.prom.register(_RegistryCollector(registry, store))
        self._registry = registry
        self._lock = threading.Lock()
        self._training_version: int | None = None

    def observe_request(self, endpoint: str, method: str, code: int, seconds: float, version: int) -> None:
        self.requests.labels(endpoint, method, str(code), str(version)).observe(seconds)

    def observe_prediction(self, version: int, confidence: float, names: Sequence[str],
                           shares: Sequence[float]) -> None:
        """``shares``: the fraction of the image's pixels predicted as each class, in ``names``' order."""
        self.confidence.labels(str(version)).observe(confidence)
        for name, share in zip(names, shares):
            self.areas.labels(str(version), name).observe(float(share))

    def _update_training_areas(self) -> None:
        version = self._registry.current
        if version is None or version == self._training_version:
            return
        self._training_version = version
        try:
            meta = read_model_config(self._registry.path(version)).get("metadata") or {}
            fractions = meta.get("class_fractions") or {}
        except Exception:  # metrics must not fail because a version cannot be read
            fractions = {}
        self.training_areas.clear()
        for name, share in fractions.items():
            self.training_areas.labels(name).set(float(share))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        with self._lock:
            self._update_training_areas()
        return generate_latest(self.prom), CONTENT_TYPE_LATEST

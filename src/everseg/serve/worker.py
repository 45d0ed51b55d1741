"""The update worker: turns queued corrections into checked model versions, one at a time.

It runs as its own process beside the HTTP app (``everseg serve`` starts it), at a lower CPU
priority, so that predictions keep the cores when both want them. Of several replicas on
one registry only the holder of the database lease trains; the others wait and take over
when a holder stops renewing it or, on the same host, its process is gone (a restart after
``kill -9`` goes on learning at once, the interrupted item first).

For each item, in arrival order:

1. the prediction of the version that served the image is scored against the corrected mask:
   that is the production accuracy (``feedback_miou``), kept per version;
2. the item teaches the active model through :class:`~everseg.learn.online.OnlineLearner`
   (same classes), or waits until every new class it names has enough examples, which are
   then taught together (:meth:`~everseg.learn.online.OnlineLearner.learn_new_classes`);
3. the candidate is published only within the holdout tolerance; a rejected one is kept and
   listed with the reason;
4. when the active version's rolling feedback mIoU falls clearly below its parent's, the
   registry is rolled back to the parent, and the reason recorded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from everseg.data.dataset import SegmentationDataset
from everseg.data.io import read_image
from everseg.devices import usable_core_ids, usable_cores
from everseg.evaluate.metrics import SegmentationMetrics
from everseg.models.versions import ModelRegistry
from everseg.serve.feedback import FeedbackItem, FeedbackStore, lease_holder_name
from everseg.serve.uploads import mask_ids

log = logging.getLogger(__name__)


def default_update_threads() -> int:
    """Half the cores, at least one. The update shares the cores with predictions at a lower
    priority, and under load its threads are descheduled at different moments and wait for each
    other at every parallel region. On 2 cores (Intel Xeon, bfloat16; benchmarks/README.md) one
    thread instead of two learned 13 corrections in 2 minutes of saturating clients against 5, and
    26 against 18 under clients asking for half the capacity, with predictions as fast; alone,
    an update took 3.8 s against 3.4 s. Only 2-core machines were measured."""
    return max(1, usable_cores() // 2)


class OtherLoad:
    """How many of this process's cores the rest of the machine kept busy lately: /proc/stat's
    busy time on those cores less this process's own CPU time, over the last few seconds.

    An update that finds the cores free trains on all of them (on 2 cores an idle update took
    3.4 s with two threads, 3.8 s with one); one that shares them with predictions keeps to
    :func:`default_update_threads`. Not on Linux, nothing is known (``busy_cores`` is None)."""

    def __init__(self, window: float = 3.0):
        self.window = window
        self.cores = usable_core_ids()
        self.samples: deque[tuple[float, float, float]] = deque()
        self.sample()

    def _now(self) -> tuple[float, float, float] | None:
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        busy = 0
        # The per-core lines come first; the rest (the interrupt counts: thousands of numbers)
        # is not split at every look of an idle worker.
        for line in lines[1:]:
            if not line.startswith("cpu"):
                break
            name, *fields = line.split()
            if int(name[3:]) in self.cores:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
                busy += user + nice + system + irq + softirq + steal
        own = os.times()
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system

    def sample(self) -> None:
        """Remember the counters now (the worker does at every idle look and every decision)."""
        now = self._now()
        if now is None:
            return
        self.samples.append(now)
        # Keep the newest sample older than the window: the span starts there.
        while len(self.samples) > 2 and now[0] - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def busy_cores(self) -> float | None:
        """Cores the others used on average since the oldest sample kept (at least the window
        when the worker idled that long; since its last decision when it was busy)."""
        now = self._now()
        if now is None or not self.samples or now[0] - self.samples[0][0] < 0.05:
            return None
        then = self.samples[0]
        return max(0.0, (now[1] - then[1]) - (now[2] - then[2])) / (now[0] - then[0])


def update_threads(busy_cores: float | None) -> int:
    """Torch threads for the next update when the rest of the machine kept ``busy_cores`` busy
    lately (None: not known): every core when that is under a quarter of them."""
    cores = usable_cores()
    return cores if busy_cores is not None and busy_cores < cores / 4 else default_update_threads()


@dataclass
class WorkerSettings:
    """How feedback becomes versions; ``everseg serve`` fills it from its options."""

    tolerance: float = 1.0  # largest holdout mIoU drop (points) a published update may cause
    new_class_examples: int = 3  # examples of each new class collected before it is taught
    rollback_window: int = 10  # scored corrections per version the automatic rollback compares
    rollback_margin: float = 5.0  # points of feedback mIoU below the parent that roll a version back
    lease_seconds: float = 30.0  # how long the update lease lasts without renewal
    poll_seconds: float = 0.1  # how often an idle worker looks for work
    # Torch threads of the update (None: every core while the rest of the machine leaves them
    # free, default_update_threads() while it does not; see OtherLoad).
    threads: int | None = None
    # CPU priority below the predictions' (0 = the same). Under 4 clients that keep both cores
    # busy, updates at 10 got about a tenth of the CPU and published 2 versions in 2 minutes; at 5,
    # 4 versions, while the clients' p50 went from 512 ms without updates to 764 ms (one
    # prediction at a time). With predictions beside each other (4553930) at 5 they learned 5
    # corrections in those 2 minutes against 11; at 0, 8, while predictions fell to half.
    nice: int = 5
    # What an update trains: "frozen" keeps the backbone (only the decoder and classifier
    # learn, and every image's backbone features are computed once and reused by later updates
    # and the guardrail), "full" trains it all. On the fresh-start benchmark (20 corrections of the
    # demo model, benchmarks/README.md) frozen updates of 3 steps replaying 2 images took 3.9 s
    # for 15 accepted and 40.6 -> 49.1 mIoU, full ones 12.9 s for 14 and 50.3.
    finetune: str = "frozen"
    steps: int = 3  # gradient steps per correction
    replay: int = 2  # remembered images replayed beside the correction in each step
    # Train each update on a random (h, w) crop instead of the whole image: less than half the
    # time per full update at 240x320 of 360x480, and fewer corrections accepted.
    crop: list[int] | None = None
    new_class_minutes: float = 2.0  # wall-time budget of teaching new classes
    device: str = "auto"  # where updates train: auto (CUDA when present) | cpu | cuda | cuda:N | mps

    def learner_kwargs(self) -> dict[str, Any]:
        """The OnlineLearner options these settings stand for (benchmarks build the same learner)."""
        return {"device": self.device, "tolerance": self.tolerance, "steps": self.steps, "replay": self.replay,
                "crop_size": tuple(self.crop) if self.crop else None, "finetune": self.finetune}


def holdout_fingerprint(dataset: SegmentationDataset) -> str:
    """SHA-256 over the holdout's image and mask files: a changed holdout is noticed."""
    h = hashlib.sha256()
    for s in dataset.samples:
        for path in (s.image, s.mask):
            h.update(Path(path).name.encode())
            h.update(Path(path).read_bytes())
    return h.hexdigest()


def feedback_miou(pred: np.ndarray, mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> float | None:
    """mIoU of one prediction against its corrected mask, over the classes in either."""
    valid = mask != ignore_index
    if not valid.any():
        return None
    idx = mask[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    confusion = np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return SegmentationMetrics.from_confusion(confusion).miou


class UpdateWorker:
    def __init__(self, registry: str | Path, holdout: SegmentationDataset, settings: WorkerSettings | None = None,
                 *, holder: str | None = None, learner_options: dict[str, Any] | None = None,
                 adapt_threads: bool = False):
        self.root = Path(registry)
        self.settings = settings or WorkerSettings()
        self.registry = ModelRegistry(self.root)
        self.store = FeedbackStore(self.root)
        self.holdout = holdout
        self.holdout_hash = holdout_fingerprint(holdout)
        self.holder = holder or lease_holder_name()
        self.learner_options = dict(learner_options or {})
        self._learner: Any = None
        self._models: dict[int, Any] = {}  # versions loaded to score the predictions they served
        # The process's torch threads follow the machine's load (the worker process only: it
        # owns its threads; a worker inside another program leaves them alone).
        self.load = OtherLoad() if adapt_threads else None

    # ------------------------------------------------------------------ the learner
    @property
    def learner(self) -> Any:
        """The online learner on the active version (made when first needed, then kept in
        step with the registry: an operator may activate another version at any time)."""
        from everseg.learn.online import OnlineLearner

        if self._learner is None:
            self._learner = OnlineLearner(self.registry.load(), self.registry, self.holdout,
                                          **self.settings.learner_kwargs(), keep_rejected=True,
                                          publish_info={"holdout": {"sha256": self.holdout_hash,
                                                                    "images": len(self.holdout)}},
                                          **self.learner_options)
            self._record_baseline()
        if self._learner.follow():
            self._record_baseline()
        return self._learner

    def _record_baseline(self) -> None:
        """Give the active version its score on this holdout when it has none, or one on another
        holdout (the file hashes differ: a changed holdout is noticed and said)."""
        learner = self._learner
        info = self.registry.entry(learner.version)["info"]
        recorded = (info.get("holdout") or {}).get("sha256")
        if recorded == self.holdout_hash and info.get("holdout_miou") is not None:
            return
        if recorded is not None:
            log.warning("the holdout differs from the one version %d was scored on (%.2f mIoU): the guardrail "
                        "now compares against its score on this holdout, %.2f", learner.version,
                        info.get("holdout_miou") or float("nan"), learner.holdout_miou)
        self.registry.annotate(learner.version, {"holdout_miou": learner.holdout_miou,
                                                 "holdout": {"sha256": self.holdout_hash, "images": len(self.holdout)}})

    def _model(self, version: int) -> Any:
        if version not in self._models:
            # Keep one: memory, not speed, is scarce.
            self._models = {version: self.registry.load(version, self.learner.device)}
        return self._models[version]

    # ------------------------------------------------------------------ one item
    def _read(self, item: FeedbackItem, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The item's image and its mask in the ids of ``names`` (by class name; ids of
        classes ``names`` lacks become 255 for now)."""
        image = read_image(item.image)
        with Image.open(item.mask) as img:
            raw = mask_ids(img)  # checked when it was received: single-channel ids or gray RGB
        lut = np.full(256, 255, dtype=np.uint8)
        for i, name in enumerate(item.label_names):
            if name in names:
                lut[i] = names.index(name)
        return image, lut[raw]

    def score_served(self, item: FeedbackItem) -> float | None:
        """The served version's prediction against the corrected mask (recorded on the item)."""
        from everseg.evaluate import predict_image

        version = item.served_version if item.served_version is not None else self.registry.current
        model = self.learner.model if version == self.learner.version else self._model(version)
        image, mask = self._read(item, tuple(model.label_space.names))
        pred, _ = predict_image(model, image, autocast_bf16=self.learner.bf16)
        score = feedback_miou(pred, mask, model.num_classes, model.label_space.ignore_index)
        self.store.update(item.id, served_version=version, feedback_miou=score)
        return score

    def process(self, item: FeedbackItem) -> None:
        """Teach one same-class correction."""
        start = time.perf_counter()
        self.store.update(item.id, status="training", detail=None)
        try:
            self.score_served(item)
            scored = time.perf_counter() - start
            learner = self.learner
            image, mask = self._read(item, tuple(learner.model.label_space.names))
            obs = learner.observe(image, mask, stem=f"feedback-{item.id}",
                                  info={"source": "feedback", "feedback_ids": [item.id]})
        except Exception as exc:  # one bad item must not stop the loop
            log.exception("feedback %d failed", item.id)
            self.store.update(item.id, status="failed", detail=f"{type(exc).__name__}: {exc}",
                              seconds=time.perf_counter() - start)
            return
        status = "held_out" if obs.held_out else ("accepted" if obs.accepted else "rejected")
        self.store.update(item.id, status=status, version=obs.version if not obs.held_out else None,
                          holdout_miou_before=obs.holdout_miou_before, holdout_miou_after=obs.holdout_miou_after,
                          seconds=time.perf_counter() - start, detail=obs.reason,
                          timings={"score_served": scored, **obs.timings})

    def process_new_classes(self, items: list[FeedbackItem], names: list[str]) -> None:
        """Teach the new classes ``names`` from ``items`` (each has some of them)."""
        start = time.perf_counter()
        ids = [i.id for i in items]
        for i in items:
            self.store.update(i.id, status="training", detail=f"teaching new classes {names}")
        try:
            for i in items:
                self.score_served(i)
            learner = self.learner
            target = tuple(learner.model.label_space.names) + tuple(names)
            pairs = [self._read(i, target) for i in items]
            obs = learner.learn_new_classes([p[0] for p in pairs], [p[1] for p in pairs], names,
                                            minutes=self.settings.new_class_minutes,
                                            info={"source": "feedback (new classes)", "feedback_ids": ids})
        except Exception as exc:
            log.exception("teaching new classes %s failed", names)
            for i in items:
                self.store.update(i.id, status="failed", detail=f"{type(exc).__name__}: {exc}",
                                  seconds=time.perf_counter() - start)
            return
        for i in items:
            self.store.update(i.id, status="accepted" if obs.accepted else "rejected", version=obs.version,
                              holdout_miou_before=obs.holdout_miou_before, holdout_miou_after=obs.holdout_miou_after,
                              seconds=time.perf_counter() - start, detail=obs.reason)

    # ------------------------------------------------------------------ the loop
    def _next_work(self) -> tuple[str, list[FeedbackItem], list[str]] | None:
        """The oldest same-class item, or a group of new-class items with enough examples."""
        known = set(self.learner.model.label_space.names)
        waiting: dict[str, list[FeedbackItem]] = {}
        first_same = None
        for item in self.store.queued():
            new = [n for n in item.label_names if n not in known]
            if not new:
                first_same = first_same or item
            for n in new:
                waiting.setdefault(n, []).append(item)
        ready = sorted(n for n, its in waiting.items() if len(its) >= self.settings.new_class_examples)
        for name, its in waiting.items():
            if name not in ready:
                for i in its:
                    detail = (f"waiting for {self.settings.new_class_examples - len(its)} more example(s) of new "
                              f"class {name!r} (taught from {self.settings.new_class_examples})")
                    if i.detail != detail:
                        self.store.update(i.id, detail=detail)
        group = {i.id: i for n in ready for i in waiting[n]}
        # An item that also names a class that is not ready keeps waiting.
        items = sorted((i for i in group.values() if all(n in known or n in ready for n in i.label_names)),
                       key=lambda i: i.id)
        # Arrival order: a ready group goes first when its last example came before the next plain item.
        if items and (first_same is None or items[-1].id < first_same.id):
            return "new", items, ready
        return ("same", [first_same], []) if first_same is not None else None

    def check_rollback(self) -> int | None:
        """Roll the active version back to its parent when its feedback mIoU fell clearly below
        the parent's; returns the version rolled back to, if any."""
        s = self.settings
        active = self.registry.current
        parent = self.registry.entry(active)["parent"] if active is not None else None
        if parent is None:
            return None
        mine = self.store.feedback_mious(active, s.rollback_window)
        theirs = self.store.feedback_mious(parent, s.rollback_window)
        if len(mine) < s.rollback_window or len(theirs) < s.rollback_window:
            return None
        ours, before = float(np.mean(mine)), float(np.mean(theirs))
        if ours >= before - s.rollback_margin:
            return None
        reason = (f"feedback mIoU of version {active} over its last {len(mine)} corrections is {ours:.1f}, "
                  f"{before - ours:.1f} points below version {parent}'s {before:.1f} (margin {s.rollback_margin})")
        self.registry.rollback(parent, kind="auto-rollback", reason=reason)
        log.warning("automatic rollback to version %d: %s", parent, reason)
        return parent

    def step(self) -> bool:
        """Do one piece of work if this worker holds the lease; True when it did something."""
        # An idle look is a read: the lease (a write) is taken only when there is work, queued
        # or left in training by a holder that is gone.
        if self.store.count("queued") == 0 and (self.store.count("training") == 0
                                                or self.store.lease_holder() is not None):
            return False
        if not self.store.acquire_lease(self.holder, self.settings.lease_seconds):
            return False
        # An update may outlast the lease (a slow machine, a long new-class job): renew it while
        # working, or another replica would take it and train beside this one.
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.settings.lease_seconds / 3):
                self.store.acquire_lease(self.holder, self.settings.lease_seconds)
        heartbeat = threading.Thread(target=renew, name="everseg-lease", daemon=True)
        heartbeat.start()
        try:
            work = self._next_work()
            if work is None:
                return False
            kind, items, names = work
            self._choose_threads()
            if kind == "same":
                self.process(items[0])
            else:
                self.process_new_classes(items, names)
            self.check_rollback()
            return True
        finally:
            done.set()
            heartbeat.join()

    def _choose_threads(self) -> None:
        """Set this process's torch threads for the next update (:func:`update_threads`)."""
        if self.load is None:
            return
        import torch

        busy = self.load.busy_cores()
        self.load.sample()
        threads = update_threads(busy)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            log.info("updates now train with %d thread(s): the rest of the machine kept %s of %d cores busy",
                     threads, "?" if busy is None else f"{busy:.2f}", usable_cores())

    def run(self, stop: threading.Event | None = None) -> None:
        """Work until ``stop`` is set (or the parent process is gone)."""
        stop = stop or threading.Event()
        parent = os.getppid()
        try:
            while not stop.is_set():
                if os.getppid() != parent:  # the server died: so does its worker
                    break
                if not self.step():
                    if self.load is not None:
                        self.load.sample()
                    stop.wait(self.settings.poll_seconds)
        finally:
            self.store.release_lease(self.holder)


def main(argv: list[str] | None = None) -> None:
    """``python -m everseg.serve.worker``: the process ``everseg serve`` starts."""
    import argparse
    import json

    import torch

    from everseg.data import open_dataset

    p = argparse.ArgumentParser(description="everseg update worker (started by everseg serve)")
    p.add_argument("--registry", required=True)
    p.add_argument("--holdout", required=True)
    p.add_argument("--dataset")
    p.add_argument("--split", default="val")
    p.add_argument("--settings", default="{}", help="WorkerSettings fields as JSON")
    args = p.parse_args(argv)
    settings = WorkerSettings(**json.loads(args.settings))
    if settings.nice:
        os.nice(settings.nice)
    torch.set_num_threads(settings.threads or default_update_threads())
    logging.basicConfig(level=logging.INFO, format="worker: %(message)s")
    holdout = open_dataset(args.holdout, dataset=args.dataset, split=args.split)
    UpdateWorker(args.registry, holdout, settings, adapt_threads=settings.threads is None).run()


if __name__ == "__main__":
    main()

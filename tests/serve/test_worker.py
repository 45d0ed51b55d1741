"""The update worker in process: feedback in arrival order, new classes collected, automatic rollback."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from everseg.data import open_dataset
from everseg.models import create_model
from everseg.models.versions import ModelRegistry
from everseg.serve.feedback import FeedbackStore
from everseg.serve import worker as worker_module
from everseg.serve.worker import (OtherLoad, UpdateWorker, WorkerSettings, default_update_threads, feedback_miou,
                                  update_threads)

pytestmark = pytest.mark.slow  # the worker trains


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def setup(tiny_camvid, tmp_path):
    train = open_dataset(tiny_camvid, dataset="folder", split="train")
    holdout = open_dataset(tiny_camvid, dataset="folder", split="test")
    torch.manual_seed(0)
    model = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=train.label_space, pretrained=False)
    ModelRegistry(tmp_path / "reg").publish(model, info={"source": "initial"})
    store = FeedbackStore(tmp_path / "reg")

    def send(i: int, mask: np.ndarray | None = None, new_classes=(), served_version=1) -> int:
        image, m = train.decoded(i)
        names = list(train.label_space.names) + list(new_classes)
        return store.add(png(image), ".png", png(m if mask is None else mask), height=image.shape[0],
                         width=image.shape[1], new_classes=list(new_classes), label_names=names,
                         served_version=served_version).id
    return train, holdout, tmp_path / "reg", store, send


@pytest.mark.parametrize("cores,threads", [(1, 1), (2, 1), (3, 1), (8, 4)])
def test_an_update_takes_half_the_cores_by_default(monkeypatch, cores, threads):
    monkeypatch.setattr(worker_module, "usable_cores", lambda: cores)
    assert default_update_threads() == threads


@pytest.mark.parametrize("cores,busy,threads", [(2, None, 1), (2, 0.1, 2), (2, 0.5, 1), (2, 1.7, 1), (8, 1.0, 8),
                                                (8, 2.5, 4), (1, 0.0, 1)])
def test_an_update_takes_every_core_only_while_the_machine_is_otherwise_quiet(monkeypatch, cores, busy, threads):
    monkeypatch.setattr(worker_module, "usable_cores", lambda: cores)
    assert update_threads(busy) == threads


def test_the_load_counts_other_processes_not_the_workers_own():
    # Whatever else the machine runs meanwhile (a benchmark, another CI job) counts too: the
    # test's own work must add nothing to it.
    quiet = OtherLoad(window=10)
    time.sleep(0.5)
    elsewhere = quiet.busy_cores()
    load = OtherLoad(window=10)
    start = time.monotonic()
    while time.monotonic() - start < 0.5:  # this process's own work
        pass
    assert load.busy_cores() < elsewhere + 0.3
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.0: pass"
    subprocess.run([sys.executable, "-c", spin], check=True)
    assert load.busy_cores() > 0.4  # one core for 1 s of the last ~1.6 s


def test_feedback_miou_counts_the_classes_in_either():
    pred = np.array([[0, 0], [1, 1]])
    mask = np.array([[0, 1], [1, 255]])
    assert feedback_miou(pred, mask, 3) == pytest.approx(100 * (1 / 2 + 1 / 2) / 2)
    assert feedback_miou(pred, np.full((2, 2), 255), 3) is None


def test_items_are_taught_in_arrival_order_and_their_status_kept(setup):
    train, holdout, root, store, send = setup
    first, second = send(0), send(1)
    worker = UpdateWorker(root, holdout, WorkerSettings(tolerance=100.0, steps=1))
    assert worker.step() and worker.step() and not worker.step()
    a, b = store.get(first), store.get(second)
    assert (a.status, b.status) == ("accepted", "accepted")
    assert (a.version, b.version) == (2, 3) and ModelRegistry(root).current == 3
    assert a.feedback_miou is not None and a.served_version == 1 and a.seconds > 0
    assert a.holdout_miou_after is not None
    info = ModelRegistry(root).entry(2)["info"]
    assert info["feedback_ids"] == [first] and len(info["holdout"]["sha256"]) == 64


def test_updates_train_on_crops_when_asked(setup):
    train, holdout, root, store, send = setup
    item = send(0)
    worker = UpdateWorker(root, holdout, WorkerSettings(tolerance=100.0, steps=1, crop=[32, 48]))
    assert tuple(worker.learner.config.data.crop_size) == (32, 48)
    assert worker.step() and store.get(item).status == "accepted"


def test_a_refused_update_is_kept_as_rejected(setup):
    train, holdout, root, store, send = setup
    item = send(0)
    UpdateWorker(root, holdout, WorkerSettings(tolerance=-100.0, steps=1)).step()
    got = store.get(item)
    assert got.status == "rejected" and "tolerance" in got.detail and got.version == 2
    reg = ModelRegistry(root)
    assert reg.current == 1 and reg.entry(2)["status"] == "rejected"


def test_new_classes_wait_for_enough_examples_then_are_taught(setup):
    train, holdout, root, store, send = setup
    n = train.label_space.num_classes
    worker = UpdateWorker(root, holdout, WorkerSettings(tolerance=100.0, steps=1, new_class_examples=2,
                                                        new_class_minutes=0.2))
    masks = []
    for i in (2, 3):
        m = train.decoded(i)[1].copy()
        m[:10, :10] = n
        masks.append(m)
    waiting = send(2, masks[0], ["Bollard"])
    plain = send(4)
    assert worker.step()  # the plain item does not wait behind the new class
    assert store.get(plain).status == "accepted" and store.get(waiting).status == "queued"
    assert "waiting for 1 more example(s) of new class 'Bollard'" in store.get(waiting).detail
    other = send(3, masks[1], ["Bollard"], served_version=2)
    assert worker.step()
    for item in (waiting, other):
        got = store.get(item)
        assert got.status == "accepted" and got.version == 3, got
    reg = ModelRegistry(root)
    assert reg.current == 3 and reg.load().label_space.names[-1] == "Bollard"
    assert reg.entry(3)["info"]["feedback_ids"] == [waiting, other]


def test_a_version_whose_corrections_score_clearly_worse_is_rolled_back(setup):
    train, holdout, root, store, send = setup
    reg = ModelRegistry(root)
    reg.publish(reg.load(1), parent=1, info={"source": "test"})
    worker = UpdateWorker(root, holdout, WorkerSettings(rollback_window=3, rollback_margin=5.0))
    for version, score in [(1, 60.0)] * 3 + [(2, 58.0)] * 3:
        store.update(send(0), status="accepted", served_version=version, feedback_miou=score)
    assert worker.check_rollback() is None  # 2 points worse: within the margin
    for _ in range(3):
        store.update(send(0), status="accepted", served_version=2, feedback_miou=40.0)
    assert worker.check_rollback() == 1 and reg.current == 1
    event = reg.events()[-1]
    assert event["kind"] == "auto-rollback" and "below version 1" in event["reason"]


def test_the_worker_follows_an_operators_rollback(setup):
    train, holdout, root, store, send = setup
    worker = UpdateWorker(root, holdout, WorkerSettings(tolerance=100.0, steps=1))
    send(0)
    worker.step()
    ModelRegistry(root).rollback()
    item = send(1)
    worker.step()
    assert ModelRegistry(root).entry(store.get(item).version)["parent"] == 1


def test_the_active_versions_holdout_score_is_recorded_and_a_changed_holdout_noticed(setup, caplog):
    import logging

    train, holdout, root, store, send = setup
    worker = UpdateWorker(root, holdout, WorkerSettings())
    worker.learner
    info = ModelRegistry(root).entry(1)["info"]
    assert info["holdout_miou"] == pytest.approx(worker.learner.holdout_miou)
    other = UpdateWorker(root, holdout.subset([0, 1]), WorkerSettings())
    with caplog.at_level(logging.WARNING, logger="everseg"):
        other.learner
    assert "the holdout differs" in caplog.text
    assert ModelRegistry(root).entry(1)["info"]["holdout"]["images"] == 2

"""A real `everseg serve` with its update worker: corrections become versions, survive kill -9,
and replicas on one registry agree on the active version with one of them training."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from everseg.data import open_dataset
from everseg.models import create_model, save_model
from everseg.models.versions import ModelRegistry
from everseg.serve.feedback import FeedbackStore

pytestmark = pytest.mark.slow
FINAL = {"accepted", "rejected", "held_out", "failed"}


@pytest.fixture
def model_dir(tiny_camvid, tmp_path):
    labels = open_dataset(tiny_camvid, dataset="folder", split="test").label_space
    save_model(create_model(arch="lraspp", backbone="mobilenet_v2", label_space=labels, pretrained=False),
               tmp_path / "model")
    return tmp_path / "model"


def send(server, tiny_camvid, stem: str) -> int:
    r = httpx.post(server.url + "/v1/feedback", headers={"Authorization": f"Bearer {server.token}"},
                   files={"image": ("i.png", (tiny_camvid / "images" / f"{stem}.png").read_bytes(), "image/png"),
                          "mask": ("m.png", (tiny_camvid / "masks" / f"{stem}.png").read_bytes(), "image/png")},
                   timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_final(server, ids, timeout=300) -> dict[int, dict]:
    deadline, done = time.time() + timeout, {}
    while time.time() < deadline and len(done) < len(ids):
        for i in ids:
            item = httpx.get(f"{server.url}/v1/feedback/{i}", timeout=10).json()
            if item["status"] in FINAL:
                done[i] = item
        time.sleep(0.5)
    assert len(done) == len(ids), f"not processed in {timeout} s: {set(ids) - set(done)}\n{server.log.read_text()[-2000:]}"
    return done


def stems(tiny_camvid) -> list[str]:
    return (tiny_camvid / "train.txt").read_text().split()


def test_acknowledged_corrections_survive_kill_9_and_are_learned_after_a_restart(start_server, tiny_camvid,
                                                                                 model_dir, tmp_path):
    registry = tmp_path / "registry"
    args = ("--model", str(model_dir), "--holdout", str(tiny_camvid), "--split", "test", "--tolerance", "100")
    server = start_server(registry, *args)
    ids = [send(server, tiny_camvid, s) for s in stems(tiny_camvid)[:3]]
    deadline = time.time() + 120  # kill it in the middle of an update
    while time.time() < deadline and FeedbackStore(registry).count("training") == 0:
        time.sleep(0.1)
    server.kill()
    reg = ModelRegistry(registry)
    active = reg.path(reg.current)
    assert (active / "config.json").is_file() and (active / "model.safetensors").is_file()
    reg.load()  # the active version is a complete model
    assert sorted(i.id for i in FeedbackStore(registry).items()) == ids  # every acknowledged item is there

    again = start_server(registry, *args)
    done = wait_final(again, ids)
    assert all(item["status"] == "accepted" for item in done.values()), done
    versions = httpx.get(again.url + "/v1/models", timeout=10).json()
    assert len([v for v in versions if v["produced_by"] == "feedback"]) == 3
    for v in versions:
        ModelRegistry(registry).load(v["version"])  # no half-written version anywhere


def test_replicas_agree_on_the_active_version_and_only_one_trains(start_server, tiny_camvid, model_dir, tmp_path):
    registry = tmp_path / "registry"
    args = ("--holdout", str(tiny_camvid), "--split", "test", "--tolerance", "100")
    a = start_server(registry, "--model", str(model_dir), *args)
    b = start_server(registry, *args)
    names = stems(tiny_camvid)
    ids = [send(a, tiny_camvid, names[0]), send(b, tiny_camvid, names[1]), send(a, tiny_camvid, names[2])]
    store, most = FeedbackStore(registry), 0
    deadline = time.time() + 300
    while time.time() < deadline:
        most = max(most, store.count("training"))
        if all(store.get(i).status in FINAL for i in ids):
            break
        time.sleep(0.05)
    assert most == 1  # one lease holder trains; the other replica's worker waits
    assert all(store.get(i).status == "accepted" for i in ids)
    # An operator's rollback from the shell: both replicas serve it within a second.
    target = ModelRegistry(registry).current - 1
    subprocess.run([sys.executable, "-m", "everseg", "models", "activate", str(target), "--registry", str(registry)],
                   check=True, capture_output=True)
    deadline = time.time() + 1.0
    while time.time() < deadline:
        seen = {httpx.get(s.url + "/healthz", timeout=5).json()["version"] for s in (a, b)}
        if seen == {target}:
            break
        time.sleep(0.05)
    assert seen == {target}

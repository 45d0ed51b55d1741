"""Data-parallel training under torchrun, on the CPU with the gloo backend: real processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from everseg.data import open_dataset
from everseg.evaluate import evaluate
from everseg.models import load_model

TINY = """data:
  crop_size: [48, 64]
  scale: [0.8, 1.2]
  val_split: test
model:
  arch: deeplabv3plus
  backbone: mobilenet_v2
  pretrained: false
  decoder_channels: 32
train:
  batch_size: 4
  bf16: 'off'
  log_every: 1
optim:
  lr: 0.05
"""


def everseg(*args, nproc=1, **kwargs):
    cmd = [sys.executable, "-m", "everseg", "train", *map(str, args), "--no-progress"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kwargs)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.mark.slow
def test_two_processes_follow_one_with_the_same_global_batch(tiny_camvid, recipe, tmp_path):
    one = everseg("--config", recipe, "--data", tiny_camvid, "--out", tmp_path / "one", "--epochs", 2)
    assert one.returncode == 0, one.stderr
    two = everseg("--config", recipe, "--data", tiny_camvid, "--out", tmp_path / "two", "--epochs", 2, nproc=2)
    assert two.returncode == 0, two.stderr
    # Process 0 alone reports and writes.
    assert (two.stdout + two.stderr).count("trained 2 epochs") == 1, two.stderr
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert len(h1) == len(h2) == 2
    # Same global batch and LR; the shares differ (each process draws its own crops and
    # normalises its half-batch on its own), so the losses agree within 15 %, not exactly.
    for a, b in zip(h1, h2):
        assert abs(a["loss"] - b["loss"]) <= 0.15 * a["loss"], (h1, h2)
    assert h2[-1]["loss"] < h2[0]["loss"]
    # Validation was split over the processes and summed: it equals one process's evaluation
    # of the saved model on the whole split.
    model = load_model(tmp_path / "two" / "model").to(memory_format=torch.channels_last)
    test = open_dataset(tiny_camvid, dataset="folder", split="test")
    alone = evaluate(model, test, channels_last=True, progress=False).metrics.miou
    assert max(h["val_miou"] for h in h2) == pytest.approx(alone, abs=0.01)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
def test_a_killed_worker_leaves_a_run_that_resumes(tiny_camvid, recipe, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "everseg", "train", "--config", str(recipe), "--data", str(tiny_camvid), "--out", str(out),
           "--epochs", "40", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pt").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (out / "checkpoint.pt").is_file(), proc.communicate()[1] if proc.poll() is not None else "no checkpoint"
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0  # torchrun reports the lost worker and stops the other
    done = torch.load(out / "checkpoint.pt", weights_only=False)["loop"]["epoch"]
    assert 1 <= done < 40
    resumed = everseg("--config", recipe, "--data", tiny_camvid, "--out", out, "--epochs", done + 1, "--resume",
                      nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} of {done + 1} epochs done" in resumed.stdout + resumed.stderr
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(done + 1))


def test_the_global_batch_must_split_over_the_processes(tiny_camvid, recipe, tmp_path):
    r = everseg("--config", recipe, "--data", tiny_camvid, "--out", tmp_path / "odd", "--epochs", 1,
                "--set", "train.batch_size=3", nproc=2)
    assert r.returncode != 0
    assert "train.batch_size 3 is the global batch" in r.stdout + r.stderr
    assert "running:" not in r.stdout  # refused before torchrun started anything
    assert not (tmp_path / "odd").exists()


def test_every_process_refuses_what_cannot_run_data_parallel():
    """The trainer's own check, for runs started with torchrun directly."""
    from everseg.learn.distributed import check_data_parallel

    check_data_parallel(8, "full", 2)
    with pytest.raises(ValueError, match="batch_size 6 is the global batch.*over the 4 processes"):
        check_data_parallel(6, "full", 4)
    with pytest.raises(ValueError, match="gradual cannot run data-parallel"):
        check_data_parallel(8, "gradual", 2)


@pytest.mark.slow
def test_a_scenario_and_learn_run_data_parallel(tiny_camvid, recipe, tmp_path):
    """Every step trains in 2 processes; process 0 alone writes the run and evaluates, and its
    numbers are those of the saved models."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "everseg"]
    run = tmp_path / "sc"
    r = subprocess.run(cli + ["scenario", "run", "--protocol", "camvid-6-5", "--strategy", "mib+replay", "--data",
                              str(tiny_camvid), "--dataset", "folder", "--out", str(run), "--config", str(recipe),
                              "--epochs", "2", "--step-epochs", "1", "--memory-size", "2", "--no-progress",
                              "--nproc", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("results:") == 1  # process 0 reports for both
    res = json.loads((run / "results.json").read_text())
    assert len(res["steps"]) == 2
    assert len(json.loads((run / "model" / "memory" / "memory.json").read_text())["items"]) == 2
    from everseg.learn.continual import evaluate_step
    from everseg.data.protocols import get_protocol
    from everseg.data.scenarios import build_scenario

    train = open_dataset(tiny_camvid, dataset="folder", split="train")
    test = open_dataset(tiny_camvid, dataset="folder", split="test")
    step1 = build_scenario(get_protocol("camvid-6-5"), train, test).steps[1]
    class_iou, _ = evaluate_step(load_model(run / "step1" / "model"), step1, bf16=False)
    expected = res["steps"][1]["class_iou"]
    assert set(class_iou) == set(expected)
    for c, v in class_iou.items():  # classes absent from the test images are None in both
        assert (v is None) == (expected[c] is None) and (v is None or abs(v - expected[c]) < 1e-6), c
    # Both processes trained the same schedule: each step's history is there once, per epoch.
    assert len(json.loads((run / "step0" / "history.json").read_text())) == 2
    assert len(json.loads((run / "step1" / "history.json").read_text())) == 1

    r = subprocess.run(cli + ["learn", "--model", str(run / "step0" / "model"), "--data", str(tiny_camvid),
                              "--dataset", "folder", "--new-classes", "Pole", "--strategy", "replay",
                              "--out", str(tmp_path / "learned"), "--config", str(recipe), "--epochs", "1",
                              "--memory-size", "2", "--no-progress", "--nproc", "2"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("new model:") == 1
    assert load_model(tmp_path / "learned" / "model").label_space.names[-1] == "Pole"

"""A real kill: SIGKILL the training process mid-epoch, then resume from the command line."""

import pytest
import json
import os
import signal
import subprocess
import sys
import time

pytestmark = pytest.mark.slow  # every test here trains a model


def test_sigkill_mid_epoch_then_resume(tiny_camvid, tmp_path):
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    # Full-size crops and batch 1 make an epoch last long enough to be killed inside it.
    cfg.write_text("data:\n  crop_size: [64, 80]\n  val_split: null\nmodel:\n  pretrained: false\n"
                   "train:\n  batch_size: 1\n  epochs: 4\n  bf16: 'off'\n  threads: 1\n")
    cmd = [sys.executable, "-m", "everseg", "train", "--config", str(cfg), "--data", str(tiny_camvid),
           "--dataset", "folder", "--out", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = run / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    time.sleep(0.3)  # into the second epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    # The checkpoint is whole (written atomically) and holds the completed epochs only.
    import torch

    done = torch.load(checkpoint, weights_only=False)["loop"]["epoch"]
    assert 1 <= done < 4
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]

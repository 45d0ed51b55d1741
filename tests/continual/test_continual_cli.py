"""`everseg scenario run` and `everseg learn` end to end on tiny real images."""

import pytest
import json

from typer.testing import CliRunner

from everseg.cli import app
from everseg.models import load_model

pytestmark = pytest.mark.slow  # every test here trains a model

runner = CliRunner()
TINY = "data:\n  crop_size: [48, 64]\nmodel:\n  pretrained: false\ntrain:\n  batch_size: 4\n  bf16: 'off'\n"


def test_scenario_run_then_learn(tiny_camvid, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    run = tmp_path / "sc"
    r = runner.invoke(app, ["scenario", "run", "--protocol", "camvid-6-5", "--strategy", "mib", "--data",
                            str(tiny_camvid), "--dataset", "folder", "--out", str(run), "--config", str(cfg),
                            "--epochs", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads((run / "results.json").read_text())
    assert len(res["steps"]) == 2
    assert all({"old_miou", "new_miou", "all_miou", "seconds"} <= set(s) for s in res["steps"])
    assert all(isinstance(s["seconds"], float) for s in res["steps"])

    # Teach the step-0 model two of the classes again, with another strategy, from the CLI.
    r = runner.invoke(app, ["learn", "--model", str(run / "step0" / "model"), "--data", str(tiny_camvid),
                            "--dataset", "folder", "--new-classes", "Pole,SignSymbol", "--strategy", "lwf+replay",
                            "--out", str(tmp_path / "learned"), "--config", str(cfg), "--epochs", "1",
                            "--memory-size", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    model = load_model(tmp_path / "learned" / "model")
    assert model.label_space.names[-2:] == ("Pole", "SignSymbol")
    assert model.metadata["parent"] == str(run / "step0" / "model")
    assert model.metadata["lineage"][-1] == str(run / "step0" / "model")
    assert (tmp_path / "learned" / "model" / "memory" / "memory.json").is_file()

    # New data, same classes (domain), with the default strategy: the final model keeps its classes.
    r = runner.invoke(app, ["learn", "--model", str(run), "--data", str(tiny_camvid), "--dataset", "folder",
                            "--out", str(tmp_path / "dom"), "--config", str(cfg), "--epochs", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    dom = load_model(tmp_path / "dom" / "model")
    assert dom.label_space.names == load_model(run / "model").label_space.names
    assert dom.metadata["strategy"] == "reptile+replay"  # new data of the same classes: not finetune


def test_learn_refuses_new_classes_without_background(tiny_camvid, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY + "  epochs: 1\n")
    r = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(tiny_camvid), "--dataset", "folder",
                            "--out", str(tmp_path / "plain"), "--no-progress", "--set", "data.val_split=null"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["learn", "--model", str(tmp_path / "plain"), "--data", str(tiny_camvid), "--dataset",
                            "folder", "--new-classes", "Pole", "--out", str(tmp_path / "x"), "--no-progress"])
    assert r.exit_code != 0 and "background" in r.output


def test_scenario_run_takes_strategy_params_and_step_budget(tiny_camvid, tmp_path):
    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    base = ["scenario", "run", "--protocol", "camvid-6-5", "--data", str(tiny_camvid), "--dataset", "folder",
            "--config", str(cfg), "--epochs", "1", "--no-progress"]
    r = runner.invoke(app, base + ["--strategy", "lwf", "--param", "lwf.alpha=3", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "lwf takes" in r.output
    r = runner.invoke(app, base + ["--strategy", "lwf+replay", "--param", "lwf.weight=3", "--param",
                                   "replay.fraction=0.25", "--step-minutes", "0.5", "--memory-size", "2",
                                   "--out", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output
    step0 = yaml.safe_load((tmp_path / "ok" / "step0" / "config.yaml").read_text())
    step1 = yaml.safe_load((tmp_path / "ok" / "step1" / "config.yaml").read_text())
    # Step 1's trainer gets the step's budget less the step-0 wrap-up it reserves (the memory update).
    assert 0.45 < step1["train"]["max_minutes"] <= 0.5 and step0["train"]["max_minutes"] != 0.5
    # What the config leaves out is fitted to the data, as train does; what it sets is kept.
    assert step0["data"]["crop_size"] == [48, 64] and step0["train"]["batch_size"] == 4
    assert step0["optim"]["lr"] == 0.02 and step0["loss"]["kind"] == "ce+dice"
    assert step1["optim"]["lr"] == pytest.approx(0.02 * 5)  # the later steps' factor on the fitted LR


def test_a_killed_scenario_run_resumes_where_it_stopped(tiny_camvid, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    run = tmp_path / "sc"
    cmd = [sys.executable, "-m", "everseg", "scenario", "run", "--protocol", "camvid-6-5", "--strategy", "mib+replay",
           "--data", str(tiny_camvid), "--dataset", "folder", "--out", str(run), "--config", str(cfg), "--epochs", "1",
           "--step-epochs", "12", "--memory-size", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (run / "step1" / "checkpoint.pt").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (run / "step1" / "checkpoint.pt").is_file(), proc.communicate()[1] if proc.poll() is not None else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished before the signal
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = torch.load(run / "step1" / "checkpoint.pt", weights_only=False)["loop"]["epoch"]
    assert 1 <= killed_at < 12
    step0 = (run / "step0" / "history.json").read_bytes()
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "--resume to continue it" in refused.stdout + refused.stderr
    other = subprocess.run([*cmd[:cmd.index("mib+replay")], "lwf", *cmd[cmd.index("mib+replay") + 1:], "--resume"],
                           capture_output=True, text=True, env=env)
    assert other.returncode != 0 and "resume it with the same scenario and strategy" in other.stdout + other.stderr

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{killed_at} of 12 epochs done" in resumed.stdout + resumed.stderr
    assert (run / "step0" / "history.json").read_bytes() == step0  # the finished step is kept, not trained again
    res = json.loads((run / "results.json").read_text())
    assert [s["step"] for s in res["steps"]] == [0, 1]
    assert [h["epoch"] for h in json.loads((run / "step1" / "history.json").read_text())] == list(range(12))
    assert (run / "model" / "memory" / "memory.json").is_file()

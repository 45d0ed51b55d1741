"""everseg tune: real Optuna studies of real (tiny) training runs."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from everseg.learn import load_config
from everseg.learn.tune import ReportToOptuna, _as_trained, _starting_point, default_space_path, load_space, tune
from test_trainer import make_trainer, tiny_config

TINY = {"data.dataset": "folder", "data.val_split": "test", "data.crop_size": [48, 64],
        "model.arch": "lraspp", "model.backbone": "mobilenet_v2", "model.pretrained": False,
        "train.epochs": 2, "train.batch_size": 4, "train.bf16": "off", "train.log_every": 1}
SPACE = "optim.lr: {low: 0.01, high: 0.1, log: true}\nloss.kind: {choices: [ce, ce+dice]}\n"


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


def test_the_shipped_space_fits_the_camvid_recipe():
    params = {p.name: p for p in load_space()}
    assert default_space_path().is_file()
    assert params["optim.lr"].log and params["data.crop_size"].choices[1] == [288, 384]
    for p in params.values():
        for value in p.values():
            load_config("configs/camvid.yaml", {p.name: value})


@pytest.mark.parametrize("text, words", [
    ("optim.lr: 0.1\n", "give {low"),
    ("optim.lr: {low: 0.1, high: 0.01}\n", "must be below high"),
    ("optim.lr: {low: 0, high: 0.1, log: true}\n", "log scale needs low > 0"),
    ("optim.lr: {low: 0.01, high: 0.1, step: 2}\n", "unknown key"),
    ("loss.kind: {choices: []}\n", "non-empty list"),
    ("[1, 2]\n", "expected a mapping"),
])
def test_a_bad_space_is_one_clear_error(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="--space") as err:
        load_space(path)
    assert words in str(err.value)


def test_a_space_that_makes_bad_configs_is_refused_before_anything_runs(tiny_camvid, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim.lrate: {low: 0.01, high: 0.1}\n")
    with pytest.raises(ValueError, match="optim.lrate"):
        tune(None, tmp_path / "study", trials=2, overrides={**TINY, "data.path": str(tiny_camvid)}, space=bad)
    bad.write_text("train.batch_size: {choices: [4, 0]}\n")
    with pytest.raises(ValueError, match="train.batch_size"):
        tune(None, tmp_path / "study", trials=2, overrides={**TINY, "data.path": str(tiny_camvid)}, space=bad)
    bad.write_text(SPACE)
    with pytest.raises(ValueError, match="grid needs choices .* optim.lr is a range"):
        tune(None, tmp_path / "study", trials=2, overrides={**TINY, "data.path": str(tiny_camvid)}, space=bad,
             sampler="grid")
    assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_the_starting_config_is_the_first_trial_only_when_the_space_holds_it(space):
    params = load_space(space)
    assert _starting_point(load_config(None), params) == {"optim.lr": 0.01, "loss.kind": '"ce"'}
    assert _starting_point(load_config(None, {"optim.lr": 0.5}), params) is None
    assert _starting_point(load_config(None, {"loss.kind": "dice"}), params) is None
    camvid = _starting_point(load_config("configs/camvid.yaml"), load_space())
    assert camvid is not None and camvid["data.crop_size"] == "[288, 384]" and camvid["train.batch_size"] == "8"


def test_pruned_trials_stop_their_training_early(tiny_camvid, tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=101.0))
    trial = study.ask()
    reporter = ReportToOptuna(trial)
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 3})
    result = make_trainer(cfg, tmp_path / "run", plugins=[reporter]).fit()
    assert reporter.pruned and result.epochs_run == 1
    assert list(study.trials[0].intermediate_values) == [0]


@pytest.mark.slow
def test_a_study_writes_the_best_config_the_table_and_plots(tiny_camvid, space, tmp_path):
    out = tmp_path / "study"
    overrides = {**TINY, "data.path": str(tiny_camvid)}
    report = tune(None, out, trials=3, overrides=overrides, space=space, progress=False, pruner="none")
    assert len(report.trials) == 3 and all(t["state"] == "complete" for t in report.trials)
    # The first trial is what train would run: the defaults with the LR and the loss fitted to the data.
    fitted = _as_trained(load_config(None, overrides))
    assert fitted.loss.kind == "ce+dice" and fitted.optim.lr == 0.02
    assert report.trials[0]["optim.lr"] == pytest.approx(0.02) and report.trials[0]["loss.kind"] == "ce+dice"
    assert report.best_value == pytest.approx(max(t["val_miou"] for t in report.trials), abs=0.01)
    for name in ("best.yaml", "trials.csv", "trials.md", "history.png", "importance.png", "study.db"):
        assert (out / name).is_file(), name
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 4
    # best.yaml is a config everseg train takes unchanged: the base with the best values.
    best = load_config(out / "best.yaml")
    assert best.optim.lr == pytest.approx(report.best_params["optim.lr"])
    assert best.loss.kind == report.best_params["loss.kind"]
    assert best.model.arch == "lraspp" and best.data.crop_size == (48, 64)
    # ... with what the trials fitted to the data, not the built-in defaults they replaced.
    assert best.optim.warmup_epochs == fitted.optim.warmup_epochs == 1.0 and best.data.scale == fitted.data.scale
    # Each validation was reported: the pruner had something to judge.
    stored = optuna.load_study(study_name="everseg", storage=f"sqlite:///{out / 'study.db'}")
    assert all(len(t.intermediate_values) == 2 for t in stored.trials)
    # The study is not replaced by mistake; --resume with more trials adds to it.
    with pytest.raises(ValueError, match="holds a tuning study"):
        tune(None, out, trials=4, overrides=overrides, space=space)
    again = tune(None, out, trials=4, overrides=overrides, space=space, resume=True, progress=False, pruner="none")
    assert len(again.trials) == 4


@pytest.mark.slow
def test_a_study_killed_mid_trial_resumes_losing_only_that_trial(tiny_camvid, space, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "everseg", "tune", "--trials", "2", "--out", str(out), "--space", str(space),
           "--data", str(tiny_camvid), "--pruner", "none"]
    for key, value in TINY.items():
        if key != "train.epochs":
            cmd += ["--set", f"{key}={value}"]
    proc = subprocess.Popen(cmd + ["--epochs", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{out / 'study.db'}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "trials" / "0000" / "checkpoint.pt").is_file():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    running = optuna.load_study(study_name="everseg", storage=storage).get_trials(states=(TrialState.RUNNING,))
    assert len(running) == 1
    resumed = subprocess.run(cmd + ["--epochs", "2", "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    trials = optuna.load_study(study_name="everseg", storage=storage).trials
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 2
    assert states.count(TrialState.FAIL) == 1 and states[0] == TrialState.FAIL  # the killed trial only
    assert "best: trial" in resumed.stderr + resumed.stdout

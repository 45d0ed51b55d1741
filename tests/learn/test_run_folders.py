"""Nothing lost: runs that refuse to overwrite, resumes that change nothing when refused,
files written with the umask's permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from everseg.cli import app
from everseg.learn.rundir import RunFolderError, claim_run_folder

runner = CliRunner()
TINY = ("data:\n  crop_size: [48, 64]\n  val_split: test\nmodel:\n  pretrained: false\n"
        "train:\n  batch_size: 4\n  bf16: 'off'\n  epochs: 1\n")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` with its mode and bytes: 'nothing changed' made checkable."""
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_cfg(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def train_args(cfg, data, out, *extra):
    return ("train", "--config", cfg, "--data", data, "--dataset", "folder", "--out", out, "--no-progress", *extra)


@pytest.mark.slow
def test_train_refuses_a_folder_holding_another_run_unless_overwrite(tiny_camvid, tiny_cfg, tmp_path):
    run = tmp_path / "run"
    assert invoke(*train_args(tiny_cfg, tiny_camvid, run)).exit_code == 0
    before = snapshot(run)
    r = invoke(*train_args(tiny_cfg, tiny_camvid, run, "--set", "train.seed=1"))
    assert r.exit_code == 2 and "already holds a run" in r.output and "--overwrite" in r.output
    assert snapshot(run) == before  # model, TensorBoard log, checkpoint: all as they were

    r = invoke(*train_args(tiny_cfg, tiny_camvid, run, "--set", "train.seed=1", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert "seed: 1" in (run / "config.yaml").read_text()
    assert len(list((run / "tensorboard").iterdir())) == 1  # one run's log, not two mixed


def test_overwrite_never_deletes_what_is_not_a_run(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    with pytest.raises(RunFolderError, match="holds no everseg run"):
        claim_run_folder(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "my notes"


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(RunFolderError, match="give one"):
        claim_run_folder(tmp_path, resume=True, overwrite=True)


@pytest.mark.slow
def test_refused_resume_changes_nothing_and_resuming_as_advised_works(tiny_camvid, tiny_cfg, tmp_path):
    run = tmp_path / "run"
    assert invoke(*train_args(tiny_cfg, tiny_camvid, run)).exit_code == 0
    before = snapshot(run)
    r = invoke(*train_args(tiny_cfg, tiny_camvid, run, "--resume", "--epochs", "2",
                           "--set", "data.crop_size=[64,64]"))
    assert r.exit_code == 2 and "differ" in r.output
    assert snapshot(run) == before  # config.yaml included: the advice below must still work

    r = invoke(*train_args(tiny_cfg, tiny_camvid, run, "--resume", "--epochs", "2"))
    assert r.exit_code == 0, r.output
    assert f"resumed {run / 'checkpoint.pt'} (1 of 2 epochs done" in r.output
    assert "continuing at epoch 2" in r.output


def test_resume_without_a_run_creates_nothing(tiny_camvid, tiny_cfg, tmp_path):
    r = invoke(*train_args(tiny_cfg, tiny_camvid, tmp_path / "new", "--resume"))
    assert r.exit_code == 2 and "no checkpoint.pt to resume from" in r.output
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_learn_refuses_to_write_over_a_run_or_its_own_model(tiny_camvid, tiny_cfg, tmp_path):
    base, other = tmp_path / "base", tmp_path / "other"
    assert invoke(*train_args(tiny_cfg, tiny_camvid, base)).exit_code == 0
    assert invoke(*train_args(tiny_cfg, tiny_camvid, other)).exit_code == 0
    kept = snapshot(tmp_path)
    learn = ("learn", "--model", base, "--data", tiny_camvid, "--dataset", "folder", "--epochs", "1",
             "--config", tiny_cfg, "--no-progress")
    for out, extra, expected in [(other, (), "already holds a run"),
                                 (base, (), "the model this run starts from"),
                                 (base, ("--overwrite",), "the model this run starts from"),
                                 (base / "model", ("--overwrite",), "the model this run starts from")]:
        r = invoke(*learn, "--out", out, *extra)
        assert r.exit_code == 2 and expected in r.output, (out, extra, r.output)
        assert snapshot(tmp_path) == kept


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(umask, tmp_path):
    from everseg.atomic import atomic_write_json, atomic_write_text
    from everseg.models import create_model, save_model

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        save_model(create_model(arch="lraspp", backbone="mobilenet_v2", num_classes=2, pretrained=False),
                   tmp_path / "model")
    finally:
        os.umask(old)
    expected_file, expected_dir = 0o666 & ~umask, 0o777 & ~umask
    for p in [tmp_path / "a.txt", tmp_path / "b.json", tmp_path / "model" / "config.json",
              tmp_path / "model" / "model.safetensors"]:
        assert stat.S_IMODE(p.stat().st_mode) == expected_file, p
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == expected_dir


@pytest.mark.slow
def test_a_training_run_is_readable_by_the_group_under_umask_022(tiny_camvid, tiny_cfg, tmp_path):
    old = os.umask(0o022)
    try:
        assert invoke(*train_args(tiny_cfg, tiny_camvid, tmp_path / "run")).exit_code == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert modes and all(m == 0o644 for m in modes.values()), modes

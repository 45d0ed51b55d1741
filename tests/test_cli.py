"""The command line end to end on a handful of tiny real images."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from everseg.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.mark.slow
def test_train_eval_predict_check(tiny_camvid, tmp_path):
    run = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("data:\n  crop_size: [48, 64]\n  val_split: test\nmodel:\n  pretrained: false\n"
                   "train:\n  batch_size: 4\n  bf16: 'off'\n")
    r = invoke("train", "--config", cfg, "--data", tiny_camvid, "--dataset", "folder", "--epochs", 2,
               "--out", run, "--no-progress")
    assert r.exit_code == 0, r.output
    assert (run / "model" / "config.json").is_file()

    # --resume with more epochs continues from the checkpoint.
    r = invoke("train", "--config", cfg, "--data", tiny_camvid, "--dataset", "folder", "--epochs", 3,
               "--out", run, "--resume", "--no-progress")
    assert r.exit_code == 0, r.output
    assert len(json.loads((run / "history.json").read_text())) == 3

    report = tmp_path / "report"
    metrics_json = tmp_path / "m.json"
    r = invoke("eval", "--model", run, "--data", tiny_camvid, "--dataset", "folder", "--split", "test",
               "--json", metrics_json, "--out", report, "--overlays", 2, "--no-progress")
    assert r.exit_code == 0, r.output
    m = json.loads(metrics_json.read_text())
    assert 0 <= m["miou"] <= 100 and "Road" in m["per_class_iou"] and 0 <= m["pixel_accuracy"] <= 100
    assert (report / "per_class_iou.png").is_file() and (report / "confusion_matrix.png").is_file()
    assert len(list((report / "overlays").glob("*.png"))) == 2

    images = sorted((tiny_camvid / "images").glob("*.png"))[:2]
    r = invoke("predict", "--model", run / "model", "--out", tmp_path / "pred", *images)
    assert r.exit_code == 0, r.output
    mask = np.array(Image.open(tmp_path / "pred" / f"{images[0].stem}_mask.png"))
    assert mask.shape == (64, 80) and mask.max() < 11
    assert (tmp_path / "pred" / f"{images[0].stem}_overlay.png").is_file()

    r = invoke("data", "check", tiny_camvid, "--dataset", "folder")
    assert r.exit_code == 0, r.output
    assert "Road" in r.output


def one_line_error(output: str) -> str:
    """The single ``error:`` line of a command's output (asserting there is exactly one)."""
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


def test_bad_inputs_give_clear_errors(tiny_camvid, tmp_path):
    # A path far longer than a terminal line: the message must stay on one line, whole.
    deep = tmp_path / ("x" * 120) / ("y" * 120) / "nothing"
    r = invoke("eval", "--model", deep, "--data", tiny_camvid)
    assert r.exit_code == 2
    assert one_line_error(r.output) == f"error: {deep}: no such model folder"
    r = invoke("eval", "--model", tiny_camvid, "--data", tiny_camvid)
    assert r.exit_code == 2 and f"{tiny_camvid}: not an everseg model folder" in one_line_error(r.output)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1\n")
    r = invoke("train", "--config", bad, "--data", tiny_camvid, "--out", tmp_path / "r")
    assert r.exit_code != 0 and "learning_rate" in r.output
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_camvid, broken)
    victim = sorted((broken / "masks").glob("*.png"))[0]
    victim.write_bytes(b"not a png")
    r = invoke("data", "check", broken, "--dataset", "folder")
    assert r.exit_code == 1 and victim.name in r.output

"""`everseg learn` and strategy combinations: bad class lists, an empty replay memory, losses
that combine or are refused, metrics of a taught model on the data it learned from."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from typer.testing import CliRunner

from everseg.cli import app
from everseg.learn.memory import ReplayMemory
from everseg.learn.strategies import build_strategies
from everseg.models import load_model

runner = CliRunner()
TINY = ("data:\n  crop_size: [48, 64]\n  val_split: null\nmodel:\n  pretrained: false\n"
        "train:\n  batch_size: 4\n  bf16: 'off'\n  epochs: 1\n")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tiny_camvid, tmp_path_factory):
    """A model trained by `everseg train` (no replay memory; its metadata records its data)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    r = invoke("train", "--config", cfg, "--data", tiny_camvid, "--dataset", "folder", "--out", root / "run",
               "--no-progress")
    assert r.exit_code == 0, r.output
    return root / "run", cfg


@pytest.mark.parametrize("value, expected", [("", "names no class"), (" , ", "names no class"),
                                             (",,", "names no class"), ("Car,Car", "more than once"),
                                             ("Pole,,Fence", "empty name between commas")])
def test_learn_refuses_empty_or_repeated_class_names(tiny_camvid, tmp_path, value, expected):
    r = invoke("learn", "--model", tmp_path / "whatever", "--data", tiny_camvid, "--out", tmp_path / "o",
               "--new-classes", value, "--no-progress")
    assert r.exit_code == 2 and expected in r.output and "--new-classes" in r.output, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_replay_on_a_bare_model_rehearses_its_training_data_not_the_new_images_twice(trained, tiny_camvid, tmp_path):
    run, cfg = trained
    r = invoke("learn", "--model", run, "--data", tiny_camvid, "--dataset", "folder", "--split", "test",
               "--out", tmp_path / "new", "--config", cfg, "--memory-size", "6", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "memory filled with" in r.output and "the data" in r.output
    memory = ReplayMemory.load(tmp_path / "new" / "model" / "memory")
    stems = [it.stem for it in memory.items]
    assert len(stems) == len(set(stems)), stems  # no image stored twice
    train_stems = set((tiny_camvid / "train.txt").read_text().split())
    from_base = [it for it in memory.items if it.step == 0]
    assert from_base and all(it.stem in train_stems for it in from_base)  # what the model learned from


@pytest.mark.slow
def test_replay_on_a_model_with_unknown_data_says_there_is_nothing_old_to_replay(trained, tiny_camvid, tmp_path):
    run, cfg = trained
    model = load_model(run / "model")
    model.metadata.pop("train_data_source")
    from everseg.models import save_model

    save_model(model, tmp_path / "bare")
    r = invoke("learn", "--model", tmp_path / "bare", "--data", tiny_camvid, "--dataset", "folder",
               "--out", tmp_path / "new", "--config", cfg, "--memory-size", "6", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "warning: replay:" in r.output and "nothing old to rehearse" in r.output and "--base-data" in r.output
    stems = [it.stem for it in ReplayMemory.load(tmp_path / "new" / "model" / "memory").items]
    assert len(stems) == len(set(stems)), stems


@pytest.mark.slow
def test_a_taught_model_is_evaluated_on_the_data_it_learned_from(trained, tiny_camvid, tmp_path):
    run, cfg = trained
    sc = tmp_path / "sc"
    r = invoke("scenario", "run", "--protocol", "camvid-6-5", "--strategy", "finetune", "--data", tiny_camvid,
               "--dataset", "folder", "--out", sc, "--config", cfg, "--no-progress")
    assert r.exit_code == 0, r.output
    r = invoke("eval", "--model", sc, "--data", tiny_camvid, "--dataset", "folder", "--split", "test",
               "--json", tmp_path / "m.json", "--no-progress")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["per_class_iou"]["background"] is None  # the model's own class has no truth here: not scored
    scored = [v for k, v in m["per_class_iou"].items() if k != "background" and v is not None]
    assert m["miou"] == pytest.approx(sum(scored) / len(scored))


def test_weighting_keeps_the_recipes_dice_term():
    from types import SimpleNamespace

    from everseg.data.labelspace import LabelSpace
    from everseg.learn.losses import LossShape, SegmentationLoss
    from everseg.learn.plugins import Batch, StepOutput
    from everseg.learn.strategies import SampleWeighting
    from everseg.learn.strategies.base import ContinualContext

    class Old(torch.nn.Conv2d):
        def forward(self, x, return_features=False):
            return super().forward(x)

    torch.manual_seed(0)
    old = Old(3, 3, 1).eval()
    weighting = SampleWeighting(gamma=0.0)  # every image weighs 1: the CE is the mean of the images' means
    weighting.begin_step(ContinualContext(step=None, step_index=1, old_model=old, old_num_classes=3))
    criterion = SegmentationLoss("ce+dice", dice_weight=0.5)
    trainer = SimpleNamespace(criterion=criterion, config=SimpleNamespace(loss=SimpleNamespace(kind="ce+dice")),
                              train_set=SimpleNamespace(label_space=LabelSpace(names=("a", "b", "c"))))
    image = torch.rand(2, 3, 8, 8)
    mask = torch.randint(0, 3, (2, 8, 8))
    logits = torch.randn(2, 3, 8, 8)
    shape = LossShape()
    weighting.shape_loss(trainer, Batch(image, mask, ["x", "y"]), StepOutput(logits, None), shape)
    torch.testing.assert_close(shape.image_weights, torch.ones(2))
    per_image = torch.stack([torch.nn.functional.cross_entropy(logits[i:i + 1], mask[i:i + 1]) for i in range(2)])
    expected = per_image.mean() + 0.5 * criterion.dice(logits, mask)
    assert float(criterion(logits, mask, shape)) == pytest.approx(float(expected), rel=1e-5)


def test_mib_says_its_loss_is_the_recipes_made_unbiased(caplog):
    from types import SimpleNamespace

    from everseg.data.labelspace import LabelSpace
    from everseg.learn.losses import LossShape, SegmentationLoss
    from everseg.learn.strategies import MiB
    from everseg.learn.strategies.base import ContinualContext

    mib = MiB()
    step = SimpleNamespace(new_classes=("Pole",), label_space=LabelSpace(names=("background", "Sky", "Pole")))
    mib.begin_step(ContinualContext(step=step, step_index=1, old_model=torch.nn.Identity(), old_num_classes=2))
    criterion = SegmentationLoss("ce+dice")
    trainer = SimpleNamespace(criterion=criterion, config=SimpleNamespace(loss=SimpleNamespace(kind="ce+dice")),
                              train_set=SimpleNamespace(label_space=step.label_space))
    with caplog.at_level(logging.INFO, logger="everseg"):
        mib.on_fit_start(trainer)
    assert trainer.criterion is criterion  # shaped, not replaced
    assert "ce+dice loss stands for background or an old class" in caplog.text
    shape = LossShape()
    mib.shape_loss(trainer, None, None, shape)
    assert shape.background_covers == 2

"""Replay memory selection and storage; the continual runner end to end on tiny real images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from everseg.data import open_dataset
from everseg.data.protocols import get_protocol
from everseg.data.scenarios import build_scenario
from everseg.learn import load_config
from everseg.learn.continual import run_scenario
from everseg.learn.memory import ReplayMemory
from everseg.models import load_model


@pytest.fixture
def designed(tmp_path):
    """Folder dataset of 6 images; class 3 ('rare') appears in one image only."""
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    contents = {"a": [1], "b": [1, 2], "c": [2], "d": [1], "e": [2], "f": [3]}
    for stem, classes in contents.items():
        mask = np.zeros((8, 8), np.uint8)
        for k, c in enumerate(classes):
            mask[k * 2:(k + 1) * 2 + (4 if c == 3 else 0), :] = c
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        Image.fromarray(np.full((8, 8, 3), 40 * len(classes), np.uint8)).save(root / "images" / f"{stem}.png")
    (root / "classes.txt").write_text("background\none\ntwo\nrare\n")
    return open_dataset(root, dataset="folder", split="all")


def test_class_balanced_memory_keeps_rare_classes(designed, tmp_path):
    mem = ReplayMemory(3, policy="class_balanced")
    mem.update(designed, step=0)
    stems = {it.stem for it in mem.items}
    assert len(stems) == 3 and "f" in stems  # the only image of the rare class is kept
    classes = set().union(*(set(it.classes().tolist()) for it in mem.items))
    assert {1, 2, 3} <= classes
    mem.save(tmp_path / "mem")
    back = ReplayMemory.load(tmp_path / "mem")
    assert [it.stem for it in back.items] == [it.stem for it in mem.items]
    np.testing.assert_array_equal(back.items[0].mask, mem.items[0].mask)


def test_reservoir_memory_respects_budget_and_is_uniform(designed):
    counts = {}
    for seed in range(200):
        mem = ReplayMemory(2, policy="reservoir", seed=seed)
        mem.update(designed, step=0)
        assert len(mem) == 2
        for it in mem.items:
            counts[it.stem] = counts.get(it.stem, 0) + 1
    # Each of the 6 images should be kept about 2/6 of the time.
    assert all(abs(c / 200 - 1 / 3) < 0.12 for c in counts.values()), counts


def tiny_cfg(**over):
    base = {"data.crop_size": [48, 64], "data.scale": [0.9, 1.1], "model.pretrained": False, "train.epochs": 1,
            "train.batch_size": 4, "train.bf16": "off", "data.val_split": None, "optim.lr": 0.02}
    base.update(over)
    return load_config(None, base)


@pytest.fixture(scope="module")
def tiny_scenario(tiny_camvid):
    train = open_dataset(tiny_camvid, dataset="folder", split="train")
    test = open_dataset(tiny_camvid, dataset="folder", split="test")
    return build_scenario(get_protocol("camvid-6-5"), train, test)


@pytest.mark.parametrize("strategy", ["finetune", "mib", "plop+replay", "joint", "lwf+ewc", "ilt+mas+weighting",
                                      "mer+replay"])
def test_runner_writes_results_and_lineage(tiny_scenario, tmp_path, strategy):
    report = run_scenario(tiny_scenario, strategy, tiny_cfg(), tmp_path / "run", progress=False, memory_size=3)
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["strategy"] == strategy and len(data["steps"]) == 2
    for s in data["steps"]:
        for key in ("old_miou", "new_miou", "all_miou", "seconds"):
            assert key in s
    assert data["steps"][0]["old_miou"] is None and data["steps"][1]["old_miou"] is not None
    assert (tmp_path / "run" / "iou_across_steps.png").is_file()
    final = load_model(tmp_path / "run" / "step1" / "model")
    assert final.label_space.names == tiny_scenario.final_label_space.names
    assert final.metadata["parent"].endswith("step0/model") and final.metadata["strategy"] == strategy
    if "replay" in strategy:
        assert json.loads((tmp_path / "run" / "step1" / "model" / "memory" / "memory.json").read_text())["items"]
    assert report.steps[1].images_seen > 0


def test_runner_reuses_a_base_model(tiny_scenario, tmp_path):
    first = run_scenario(tiny_scenario, "finetune", tiny_cfg(), tmp_path / "a", progress=False)
    again = run_scenario(tiny_scenario, "mib", tiny_cfg(), tmp_path / "b", progress=False,
                         base_model=tmp_path / "a" / "step0" / "model")
    assert again.steps[0].seconds == 0.0
    assert again.steps[0].class_iou == first.steps[0].class_iou
    step1 = load_model(tmp_path / "b" / "step1" / "model")
    assert step1.metadata["parent"] == str(tmp_path / "a" / "step0" / "model")
    assert not (tmp_path / "b" / "step0" / "model").exists()  # the base is not copied

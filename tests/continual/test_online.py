"""OnlineLearner: single images in, guarded new versions out, rollback."""

import json

import numpy as np
import pytest
import torch

from everseg.data import open_dataset
from everseg.learn.online import OnlineLearner
from everseg.models import create_model
from everseg.models.registry import ModelRegistry


@pytest.fixture
def setup(tiny_camvid, tmp_path):
    train = open_dataset(tiny_camvid, dataset="folder", split="train")
    holdout = open_dataset(tiny_camvid, dataset="folder", split="test")
    torch.manual_seed(0)
    model = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=train.label_space, pretrained=False)
    return train, holdout, model, tmp_path / "registry"


def test_observe_publishes_versions_with_parents_and_rolls_back(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=2, replay=1, tolerance=100.0, memory_size=2)
    assert learner.version == 1
    served_before = learner.model
    image, mask = train.decoded(0)
    obs = learner.observe(image, mask, stem="first")
    assert obs.accepted and obs.version == 2 and learner.version == 2
    assert served_before is not learner.model  # the update trained a copy, then swapped it in
    image2, mask2 = train.decoded(1)
    learner.observe(image2, mask2)
    assert learner.version == 3 and len(learner.memory) == 2
    index = json.loads((root / "registry.json").read_text())
    assert [(v["version"], v["parent"]) for v in index["versions"]] == [(1, None), (2, 1), (3, 2)]
    assert index["versions"][1]["info"]["observed"] == "first"
    pred = learner.predict(image)
    assert pred.shape == mask.shape and pred.max() < train.label_space.num_classes
    assert learner.rollback() == 2 and learner.version == 2
    assert ModelRegistry(root).current == 2  # survives a restart


def test_guardrail_rejects_updates_that_lose_accuracy(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=1, replay=1, tolerance=-100.0)
    image, mask = train.decoded(0)
    obs = learner.observe(image, mask)
    assert not obs.accepted and obs.version == 1 and learner.version == 1
    assert len(ModelRegistry(root).versions()) == 1


def test_bad_observation_names_the_problem(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=1)
    image, mask = train.decoded(0)
    with pytest.raises(ValueError, match="outside"):
        learner.observe(image, np.full_like(mask, 42))
    with pytest.raises(ValueError, match="mask is"):
        learner.observe(image, mask[:-1])

"""OnlineLearner: single images in, guarded new versions out, rollback."""

import copy

import numpy as np
import pytest
import torch

from everseg.data import open_dataset
from everseg.learn.online import FeatureCache, OnlineLearner
from everseg.models import create_model
from everseg.models.versions import ModelRegistry

pytestmark = pytest.mark.slow  # every test here trains a model


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
    versions = ModelRegistry(root).versions()
    assert [(v["version"], v["parent"]) for v in versions] == [(1, None), (2, 1), (3, 2)]
    assert versions[1]["info"]["observed"] == "first" and versions[1]["info"]["holdout_miou"] == obs.holdout_miou_after
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


def test_a_diverged_update_is_refused_and_the_learner_goes_on(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=3, replay=1, tolerance=100.0, lr=1e30, keep_rejected=True)
    obs = learner.observe(*train.decoded(0))
    assert obs.diverged and not obs.accepted and obs.holdout_miou_after is None
    assert obs.version == 1 and learner.version == 1 and "diverged" in obs.reason and "not finite" in obs.reason
    assert len(ModelRegistry(root).versions()) == 1  # a model of NaNs is not even kept as rejected
    assert len(learner.memory) == 0  # nor is the image that made it replayed later
    image, _ = train.decoded(1)
    np.testing.assert_array_equal(learner.predict(image), OnlineLearner(model, root, holdout).predict(image))


def test_bad_observation_names_the_problem(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=1)
    image, mask = train.decoded(0)
    with pytest.raises(ValueError, match="outside"):
        learner.observe(image, np.full_like(mask, 42))
    with pytest.raises(ValueError, match="mask is"):
        learner.observe(image, mask[:-1])


def test_every_kth_image_is_held_out_and_scored_from_then_on(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=1, replay=1, tolerance=100.0, holdout_every=2)
    first = learner.observe(*train.decoded(0), stem="a")
    assert not first.held_out and first.accepted
    before = learner.holdout_miou
    second = learner.observe(*train.decoded(1), stem="b")
    assert second.held_out and not second.accepted and second.version == first.version
    assert [stem for *_, stem in learner._held_out] == ["b"]
    assert len(learner.memory) == 1  # a held-out image is never trained on, nor replayed
    # the guardrail's reference now includes the held-out image: recompute it from scratch
    from everseg.evaluate import evaluate
    from everseg.evaluate.metrics import SegmentationMetrics

    parts = [evaluate(learner.model, d, autocast_bf16=learner.bf16, progress=False).metrics.confusion
             for d in (holdout, learner._held_out_set(learner._held_out))]
    expected = SegmentationMetrics.from_confusion(parts[0] + parts[1]).miou
    assert learner.holdout_miou == pytest.approx(expected, abs=1e-6)
    assert learner.holdout_miou != pytest.approx(before, abs=1e-9)
    with pytest.raises(ValueError, match="holdout_every"):
        OnlineLearner(model, root, holdout, holdout_every=1)


def test_update_loss_is_weighted_by_memory_and_new_image(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=1, memory_size=4)
    _, mask = train.decoded(0)
    weights = learner._update_config(mask).loss.class_weights
    assert len(weights) == model.num_classes
    ids, counts = np.unique(mask[mask != 255], return_counts=True)
    common, rare = ids[counts.argmax()], ids[counts.argmin()]
    assert weights[rare] > weights[common]  # inverse_sqrt: fewer pixels, larger weight
    assert OnlineLearner(model, root, holdout, class_weights="none")._update_config(mask).loss.class_weights == "none"
    with pytest.raises(ValueError, match="unknown class weighting"):
        OnlineLearner(model, root, holdout, class_weights="loud")


def test_restarted_learner_takes_back_the_published_memory(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=1, replay=1, tolerance=100.0, memory_size=3)
    learner.observe(*train.decoded(0), stem="kept")
    restarted = OnlineLearner(model, root, holdout, steps=1)
    assert restarted.version == learner.version
    assert [item.stem for item in restarted.memory.items] == ["kept"]


def test_rejected_candidates_are_kept_with_the_reason_and_never_served(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=1, replay=1, tolerance=-100.0, keep_rejected=True,
                            publish_info={"holdout": {"sha256": "abc"}})
    obs = learner.observe(*train.decoded(0), info={"feedback_ids": [7]})
    assert not obs.accepted and obs.version == 2 and learner.version == 1 and "tolerance" in obs.reason
    entry = ModelRegistry(root).entry(2)
    assert entry["status"] == "rejected" and entry["reason"] == obs.reason and not entry["active"]
    assert entry["info"]["feedback_ids"] == [7] and entry["info"]["holdout"] == {"sha256": "abc"}


def test_the_learner_follows_a_version_activated_by_another_process(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=1, replay=1, tolerance=100.0)
    learner.observe(*train.decoded(0))
    assert learner.version == 2
    ModelRegistry(root).rollback()  # e.g. `everseg models rollback` while the server runs
    assert learner.follow() and learner.version == 1
    obs = learner.observe(*train.decoded(1))
    assert ModelRegistry(root).entry(obs.version)["parent"] == 1  # trained from what is served


def test_new_classes_are_taught_together_and_guarded(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=1, replay=1, tolerance=100.0, memory_size=4)
    learner.observe(*train.decoded(0))  # something old in the memory to rehearse
    n = model.num_classes
    images, masks = [], []
    for i in (1, 2):
        image, mask = train.decoded(i)
        mask = mask.copy()
        mask[:8, :8] = n  # the new class, id right after the known ones
        images.append(image)
        masks.append(mask)
    obs = learner.learn_new_classes(images, masks, ["Bollard"], epochs=1)
    assert obs.accepted and learner.model.label_space.names[-1] == "Bollard"
    assert learner.model.num_classes == n + 1
    assert ModelRegistry(root).entry(obs.version)["info"]["new_classes"] == ["Bollard"]
    # The holdout knows 11 classes; it is still scored on them, and later updates work.
    assert learner.observe(*train.decoded(3)).version > obs.version


def test_frozen_updates_score_the_holdout_on_reused_backbone_features(setup):
    train, holdout, model, root = setup
    learner = OnlineLearner(model, root, holdout, steps=1, replay=1, tolerance=100.0, finetune="frozen",
                            holdout_every=2)
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    obs = learner.observe(*train.decoded(0))
    assert obs.accepted
    after_first = len(calls)
    learner.observe(*train.decoded(1))  # held out: scored by the served model, which is never wrapped
    obs = learner.observe(*train.decoded(2))
    # The second candidate's held-out features came from the cache (the backbone is the parent's):
    # the backbone ran on the newly held-out image (scored by the served model, then once for the
    # candidate) and on the training batch; the holdout's images were not computed again.
    assert after_first > len(holdout)
    assert len(calls) - after_first == 3, (len(calls) - after_first, len(holdout))
    candidate = learner.model
    torch.testing.assert_close(learner._holdout_confusion(candidate), learner._confusion, rtol=0, atol=0)
    fresh = OnlineLearner(create_model(arch="lraspp", backbone="mobilenet_v2", label_space=train.label_space,
                                       pretrained=False), root, holdout, finetune="full")
    fresh._held_out = list(learner._held_out)
    np.testing.assert_array_equal(fresh._holdout_confusion(candidate), learner._confusion)
    assert isinstance(candidate.backbone, torch.nn.Module) and not hasattr(candidate.backbone, "cache")


def test_frozen_updates_train_on_reused_backbone_features_and_learn_the_same(setup):
    train, holdout, model, root = setup
    learners, calls = [], []
    for name, cache_bytes in (("reused", 2**30), ("computed", 0)):
        learner = OnlineLearner(copy.deepcopy(model), root.with_name(name), holdout, steps=4, replay=1,
                                tolerance=100.0, finetune="frozen", memory_size=2)
        learner.feature_cache_bytes = cache_bytes
        learner._features = (None, FeatureCache(cache_bytes))
        learner.observe(*train.decoded(0))
        count = []
        learner.model.backbone.register_forward_hook(lambda *_: count.append(1))
        learner.observe(*train.decoded(1))
        learners.append(learner)
        calls.append(len(count))
    reused, computed = learners
    # The second update's candidate starts from the first one's model: its 4 training steps and
    # its holdout scoring find most images (whole or mirrored) already computed.
    assert calls[0] < calls[1], calls
    for (name, a), b in zip(reused.model.state_dict().items(), computed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert reused.holdout_miou == pytest.approx(computed.holdout_miou, abs=1e-6)


def test_feature_cache_drops_the_least_recently_used():
    cache = FeatureCache(max_bytes=3 * 4 * 10)
    for k in "abc":
        cache.put((k,), [torch.zeros(10)])
    assert cache.get(("a",)) is not None  # "b" is now the oldest
    cache.put(("d",), [torch.zeros(10)])
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None and len(cache) == 3
    cache.put(("huge",), [torch.zeros(100)])  # larger than the cache: not kept, nothing dropped
    assert cache.get(("huge",)) is None and len(cache) == 3 and cache.bytes == 120

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
    for a, b in zip(back.items, mem.items):
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.image, b.image)
    # saved again (each published version saves its memory): the same files, byte for byte
    back.save(tmp_path / "again")
    for f in (tmp_path / "mem").iterdir():
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name


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


def test_a_memory_takes_its_own_storage_policy(designed):
    from everseg.learn.memory import StoragePolicy

    class FirstImages(StoragePolicy):
        name = "first"

        def update(self, memory, dataset, step):
            from everseg.learn.memory import _item

            while len(memory.items) < min(memory.budget, len(dataset)):
                memory.items.append(_item(dataset, len(memory.items), step))

    mem = ReplayMemory(2, policy=FirstImages())
    mem.update(designed, step=0)
    assert [it.stem for it in mem.items] == [designed.samples[0].stem, designed.samples[1].stem]
    with pytest.raises(ValueError, match="unknown memory policy 'newest'; choose reservoir or class_balanced"):
        ReplayMemory(2, policy="newest")


def test_replay_owns_its_memory_from_base_to_saved_model(designed, tmp_path):
    """Replay loads the base model's memory, fills one from what the base learned when it has
    none, offers each trained step's images, and saves the memory beside every model."""
    from types import SimpleNamespace

    from everseg.learn.strategies import Replay, RunStart

    stored = ReplayMemory(2, policy="reservoir")
    stored.update(designed.subset([0, 1]), step=0)
    stored.save(tmp_path / "base" / "memory")
    replay = Replay(memory_size=4)
    replay.begin_run(RunStart(base_model=tmp_path / "base", seed=0))
    assert [it.stem for it in replay.memory.items] == [it.stem for it in stored.items]
    assert replay.memory.budget == 4  # the run's budget, not the stored one
    replay.learned_elsewhere(SimpleNamespace(step=SimpleNamespace(train=designed), step_index=0))
    assert len(replay.memory) == 2  # the stored memory already holds what the base learned from

    bare = Replay(memory_size=3, memory_policy="reservoir")
    bare.begin_run(RunStart(base_model=tmp_path / "no-memory-here", seed=0))
    assert len(bare.memory) == 0 and bare.memory.policy.name == "reservoir"
    bare.learned_elsewhere(SimpleNamespace(step=SimpleNamespace(train=designed.subset([0, 1])), step_index=0))
    assert {it.step for it in bare.memory.items} == {0} and len(bare.memory) == 2
    bare.end_step(SimpleNamespace(step=SimpleNamespace(train=designed.subset([2, 3, 4])), step_index=1), None)
    assert len(bare.memory) == 3 and bare.memory.seen == 5
    bare.save(tmp_path / "step1" / "model")
    assert len(ReplayMemory.load(tmp_path / "step1" / "model" / "memory")) == 3

    given = ReplayMemory(5, policy="class_balanced")
    caller = Replay()
    caller.memory = given  # learn fills it from the data the model learned from
    caller.begin_run(RunStart(base_model=tmp_path / "base", seed=0))
    assert caller.memory is given


@pytest.mark.parametrize("spec, reason", [("finetune+replay", "finetune plus a method is that method"),
                                          ("mib+joint", "joint retrains on all the data"),
                                          ("joint+finetune", "is used alone")])
def test_the_bounds_are_strategies_used_alone(spec, reason):
    from everseg.learn.strategies import Finetune, Joint, build_strategies

    (joint,), (finetune,) = build_strategies("joint"), build_strategies("finetune")
    assert isinstance(joint, Joint) and joint.retrains and isinstance(finetune, Finetune) and not finetune.retrains
    with pytest.raises(ValueError, match=reason):
        build_strategies(spec)
    with pytest.raises(ValueError, match="joint has no hyper-parameters"):
        build_strategies("joint", {"replay.fraction": 1.0})


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
                                      "mer", "reptile+replay"])
@pytest.mark.slow
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
    for name in ("ewc", "mas"):
        assert (tmp_path / "run" / "step1" / "model" / f"{name}-importance.pt").is_file() == (name in strategy)
    if "replay" in strategy or strategy == "mer":
        assert json.loads((tmp_path / "run" / "step1" / "model" / "memory" / "memory.json").read_text())["items"]
    assert report.steps[1].images_seen > 0


@pytest.mark.slow
def test_runner_reuses_a_base_model(tiny_scenario, tmp_path):
    first = run_scenario(tiny_scenario, "finetune", tiny_cfg(), tmp_path / "a", progress=False)
    again = run_scenario(tiny_scenario, "mib", tiny_cfg(), tmp_path / "b", progress=False,
                         base_model=tmp_path / "a" / "step0" / "model")
    assert again.steps[0].seconds == 0.0
    assert again.steps[0].class_iou == first.steps[0].class_iou
    step1 = load_model(tmp_path / "b" / "step1" / "model")
    assert step1.metadata["parent"] == str(tmp_path / "a" / "step0" / "model")
    assert not (tmp_path / "b" / "step0" / "model").exists()  # the base is not copied


@pytest.mark.parametrize("spec, params, background", [
    ("plop", {}, True),  # as published (the authors' --init_balanced)
    ("plop", {"plop.init": "random"}, False),
    ("plop+replay", {"plop.init": "random"}, False),
    ("mib", {}, True),
    ("lwf", {}, False),
])
def test_new_classifier_rows_start_as_the_strategy_says(tiny_scenario, spec, params, background):
    from everseg.learn.continual import _step_model
    from everseg.learn.strategies import build_strategies
    from everseg.models import create_model

    torch.manual_seed(0)
    old = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=tiny_scenario.steps[0].label_space,
                       pretrained=False)
    new = _step_model(tiny_cfg(), tiny_scenario.steps[1], old, build_strategies(spec, params))
    rows = new.classifier.weight[old.num_classes:].detach()
    assert torch.equal(rows, old.classifier.weight[:1].detach().expand_as(rows)) == background


def test_plop_refuses_an_unknown_initialisation():
    from everseg.learn.strategies import build_strategies

    with pytest.raises(ValueError, match="plop.init must be 'background' or 'random', not 'zeros'"):
        build_strategies("plop", {"plop.init": "zeros"})


def test_domain_step_scores_classes_on_every_view_not_the_first(tiny_camvid):
    from types import SimpleNamespace

    from everseg.evaluate import evaluate
    from everseg.learn.continual import evaluate_step
    from everseg.models import create_model

    test = open_dataset(tiny_camvid, dataset="folder", split="test")
    torch.manual_seed(0)
    model = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=test.label_space, pretrained=False)
    step = SimpleNamespace(label_space=test.label_space, scored_ids=(),
                           tests={"a": test.subset([0, 1]), "b": test.subset([2, 3])})
    class_iou, per_view = evaluate_step(model, step, bf16=False)
    whole = evaluate(model, test, progress=False).metrics.iou
    names = test.label_space.names
    for i, name in enumerate(names):
        assert (class_iou[name] is None) == (whole[i] != whole[i])
        if class_iou[name] is not None:
            assert class_iou[name] == pytest.approx(whole[i])
    first = evaluate(model, step.tests["a"], progress=False).metrics
    assert per_view["a"] == pytest.approx(first.miou)


@pytest.mark.slow
def test_replay_from_a_shared_base_remembers_the_base_images(tiny_scenario, tmp_path):
    run_scenario(tiny_scenario, "finetune", tiny_cfg(), tmp_path / "a", progress=False)
    base = tmp_path / "a" / "step0" / "model"
    assert not (base / "memory").exists()  # finetune keeps no memory
    run_scenario(tiny_scenario, "replay", tiny_cfg(), tmp_path / "b", progress=False, base_model=base,
                 memory_size=3)
    memory = ReplayMemory.load(tmp_path / "b" / "step1" / "model" / "memory")
    # Without the base's images the memory would hold step 1's only, and replay would replay
    # nothing old during step 1.
    assert any(item.step == 0 for item in memory.items)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ewc", "mas"])
def test_importance_from_a_model_trained_elsewhere_is_measured_before_the_step(tiny_scenario, tmp_path, strategy):
    """A shared base (or ``learn`` on a bare model) has no importance: without this step 1 had no penalty."""
    import copy

    from everseg.learn import Trainer
    from everseg.learn.optim import build_optimizer
    from everseg.learn.strategies import build_strategies
    from everseg.learn.strategies.base import ContinualContext
    from everseg.models import create_model

    step = tiny_scenario.steps[1]
    torch.manual_seed(0)
    old = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=tiny_scenario.steps[0].label_space,
                       pretrained=False).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    new = copy.deepcopy(old)
    new.grow_classifier(step.label_space)
    cfg = tiny_cfg()
    (s,) = build_strategies(strategy)
    s.begin_step(ContinualContext(step=step, step_index=1, old_model=old, old_num_classes=old.num_classes))
    trainer = Trainer(new, step.train.with_transform(None), None, cfg, tmp_path, plugins=[s], progress=False,
                      write_run=False)
    trainer.optimizer = build_optimizer(new, cfg.optim)
    s.on_fit_start(trainer)
    assert sum(float(w.sum()) for w in s.importance.values()) > 0
    for n, p in old.named_parameters():
        torch.testing.assert_close(s.anchor[n], p)
    assert s.penalty(old).item() == 0.0  # at the anchor
    moved = copy.deepcopy(old)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01)
    assert s.penalty(moved).item() > 0.0
    # The spring may not overshoot its anchor in one SGD step: lr * 2 * weight * importance <= 1.
    s.weight = 1e6
    s.on_fit_start(trainer)
    cap = 1.0 / (2 * 1e6 * cfg.optim.lr)
    assert max(float(w.max()) for w in s.importance.values()) <= cap * (1 + 1e-6)


@pytest.mark.parametrize("strategy", ["ewc", "mas"])
def test_importance_saved_with_the_model_carries_over_to_a_run_continuing_from_it(tiny_scenario, tmp_path,
                                                                                  strategy):
    """--resume (or learn again) goes on accumulating the importance instead of measuring it anew."""
    from everseg.learn.strategies import build_strategies
    from everseg.learn.strategies.base import ContinualContext, RunStart
    from everseg.models import create_model

    torch.manual_seed(0)
    model = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=tiny_scenario.steps[1].label_space,
                         pretrained=False).eval()
    (first,) = build_strategies(strategy)
    first.importance = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    first.save(tmp_path)
    (again,) = build_strategies(strategy)
    again.begin_run(RunStart(base_model=tmp_path, seed=0))

    def not_measured(*args, **kwargs):
        raise AssertionError("importance measured again although it was stored")

    again._estimate = not_measured
    again.begin_step(ContinualContext(step=tiny_scenario.steps[1], step_index=2, old_model=model,
                                      old_num_classes=model.num_classes))

    class Optimiser:  # what on_fit_start reads of a Trainer: the device and the LR (for the cap)
        param_groups = [{"lr": 0.0}]

    class Trainer:
        device, optimizer = torch.device("cpu"), Optimiser()

    again.on_fit_start(Trainer())
    for n, p in model.named_parameters():
        torch.testing.assert_close(again.importance[n], first.importance[n])
        torch.testing.assert_close(again.anchor[n], p)
    (fresh,) = build_strategies(strategy)
    fresh.begin_run(RunStart(base_model=tmp_path / "elsewhere", seed=0))  # nothing stored: nothing loaded
    assert not fresh.importance
    (tmp_path / f"{strategy}-importance.pt").write_text("garbage")
    with pytest.raises(ValueError, match=f"{strategy}-importance.pt: not a readable {strategy} importance file"):
        build_strategies(strategy)[0].begin_run(RunStart(base_model=tmp_path, seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("stale_background", ["ignore", "keep"])
def test_replay_ignores_background_of_images_stored_before_new_classes(tiny_scenario, tmp_path, stale_background):
    """A stored mask's background means "none of the classes known then": not evidence against later ones."""
    from everseg.learn import Trainer
    from everseg.learn.memory import ReplayMemory
    from everseg.learn.plugins import Batch
    from everseg.learn.strategies.base import ContinualContext
    from everseg.learn.strategies.replay import Replay
    from everseg.models import create_model

    base, step = tiny_scenario.steps
    memory = ReplayMemory(2, policy="reservoir")
    memory.update(base.train, step=0)
    model = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=step.label_space, pretrained=False)
    trainer = Trainer(model, step.train.with_transform(None), None, tiny_cfg(), tmp_path, progress=False,
                      write_run=False)
    replay = Replay(fraction=1.0, stale_background=stale_background)
    replay.memory = memory
    replay.begin_step(ContinualContext(step=step, step_index=1, old_model=None,
                                       old_num_classes=base.label_space.num_classes))
    image, mask = step.train.decoded(0)
    batch = Batch(image=torch.from_numpy(image).permute(2, 0, 1)[None].float(),
                  mask=torch.from_numpy(mask)[None].long(), stems=["x"])
    replay.before_forward(trainer, batch)
    replayed = batch.mask[1:]
    stored = torch.stack([torch.from_numpy(it.mask).long() for it in memory.items])
    stored = stored[[next(j for j, it in enumerate(memory.items) if it.stem == s) for s in batch.stems[1:]]]
    if stale_background == "ignore":
        assert (replayed == 0).sum() == 0 and (stored == 0).sum() > 0
        torch.testing.assert_close(replayed, torch.where(stored == 0, torch.full_like(stored, 255), stored))
    else:
        torch.testing.assert_close(replayed, stored)
    # Domain steps teach no class: nothing there is stale.
    import dataclasses

    replay.begin_step(ContinualContext(step=dataclasses.replace(step, new_classes=()), step_index=1, old_model=None,
                                       old_num_classes=0))
    assert not replay._background_is_stale(0)


@pytest.mark.slow
def test_domain_run_records_the_untrained_models_scores_for_forward_transfer(tiny_camvid, tmp_path):
    from everseg.data.scenarios import ScenarioSpec, StepSpec
    from everseg.learn.continual import untrained_domain_miou

    train = open_dataset(tiny_camvid, dataset="folder", split="train")
    test = open_dataset(tiny_camvid, dataset="folder", split="test")
    stems = [s.stem for s in train.samples]
    spec = ScenarioSpec("two-sources", "domain", (StepSpec(images=tuple(stems[:4])), StepSpec(images=tuple(stems[4:]))))
    scenario = build_scenario(spec, train, test)
    report = run_scenario(scenario, "finetune", tiny_cfg(), tmp_path / "run", progress=False)
    # The reference is the seeded model step 0 starts from: measured again later (a benchmark
    # whose shared base predates the field does so), it is the same number.
    again = untrained_domain_miou(scenario, tiny_cfg())
    assert report.initial_domain_miou == again and set(again) == {"all"}
    assert report.steps[0].seconds > 0


@pytest.mark.slow
def test_replay_class_weights_count_the_memory_as_often_as_it_is_replayed(tiny_scenario, tmp_path):
    """Old classes appear only in replayed images: weighting must see them, or their weight stays 1."""
    from everseg.learn import Trainer, compute_class_weights
    from everseg.learn.memory import ReplayMemory
    from everseg.learn.strategies.base import ContinualContext
    from everseg.learn.strategies.mib import MiB
    from everseg.learn.strategies.replay import Replay
    from everseg.models import create_model

    base, step = tiny_scenario.steps
    memory = ReplayMemory(2, policy="reservoir")
    memory.update(base.train, step=0)
    model = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=step.label_space, pretrained=False)
    cfg = tiny_cfg(**{"loss.class_weights": "median_frequency", "loss.max_class_weight": 1000.0})
    train = step.train.with_transform(None)
    default = Replay(fraction=0.5)
    default.memory = memory
    default.begin_step(ContinualContext(step=step, step_index=1, old_model=model,
                                        old_num_classes=base.label_space.num_classes))
    replay, mib = Replay(fraction=0.5, memory_in_weights=True), MiB()
    replay.memory = memory
    ctx = ContinualContext(step=step, step_index=1, old_model=model, old_num_classes=base.label_space.num_classes)
    for s in (replay, mib):
        s.begin_step(ctx)
    trainer = Trainer(model, train, None, cfg, tmp_path, progress=False, write_run=False, plugins=[replay, mib])
    step_only = trainer.criterion.class_weights.clone()
    default.on_fit_start(trainer)
    torch.testing.assert_close(trainer.criterion.class_weights, step_only)  # off by default
    for s in (replay, mib):
        s.on_fit_start(trainer)
    n = step.label_space.num_classes
    stored = np.stack([np.bincount(it.mask[(it.mask != 255) & (it.mask != 0)], minlength=n)[:n]
                       for it in memory.items])  # stored before step 1: their background is stale
    counts = train.class_pixel_counts(per_image=True)
    expected = compute_class_weights(np.concatenate([counts, stored * 0.5 * len(counts) / 2]), "median_frequency",
                                     1000.0)
    torch.testing.assert_close(trainer.criterion.class_weights, expected)
    old = [i for i in range(1, base.label_space.num_classes) if stored[:, i].sum() > 0]
    assert old and all(step_only[i] == 1.0 for i in old)  # unseen in the step's own images
    assert not torch.allclose(trainer.criterion.class_weights[old], step_only[old])
    # MiB shapes the same criterion: the replay-aware weights stay in its unbiased loss.
    assert type(trainer.criterion).__name__ == "SegmentationLoss"


@pytest.mark.slow
def test_a_steps_budget_counts_the_strategys_set_up(tiny_scenario, tmp_path, fake_clock):
    from everseg.learn.strategies.base import Strategy

    class SlowSetUp(Strategy):
        name = "slow-set-up"

        def begin_step(self, ctx):
            super().begin_step(ctx)
            fake_clock.advance(2.0)  # e.g. an importance pass before training

        def before_forward(self, trainer, batch):
            fake_clock.advance(1.0)  # each training step takes one (fake) second

    # Step 0 trains 1 epoch (2 steps of 4 images) without a budget; step 1 gets 3.5 s.
    report = run_scenario(tiny_scenario, [SlowSetUp()], tiny_cfg(**{"train.epochs": 5}), tmp_path / "run",
                          progress=False, step_minutes=3.5 / 60)
    # 2 s of set-up + 1 s step = 3 s; a second step would end at 4 s, past the step's 3.5 s.
    assert report.steps[1].images_seen == 4 and report.steps[1].seconds == pytest.approx(3.0)


@pytest.fixture(scope="module")
def three_steps(tiny_camvid):
    """camvid-6-1's base and first two one-class steps (Pole, SignSymbol)."""
    import dataclasses

    spec = get_protocol("camvid-6-1")
    spec = dataclasses.replace(spec, steps=spec.steps[:3])
    train = open_dataset(tiny_camvid, dataset="folder", split="train")
    return build_scenario(spec, train, open_dataset(tiny_camvid, dataset="folder", split="test"))


@pytest.mark.slow
def test_a_steps_wrap_up_is_reserved_from_the_next_steps_budget(three_steps, tmp_path, fake_clock):
    from everseg.learn.strategies.base import Strategy


    class SlowWrapUp(Strategy):
        name = "slow-wrap-up"

        def before_forward(self, trainer, batch):
            fake_clock.advance(1.0)  # each training step takes one (fake) second

        def end_step(self, ctx, trainer):
            fake_clock.advance(1.5)  # e.g. an importance pass after training

    report = run_scenario(three_steps, [SlowWrapUp()], tiny_cfg(**{"train.epochs": 5, "train.batch_size": 1}),
                          tmp_path / "run", progress=False, step_minutes=4.0 / 60)
    # Step 0 (no budget) measured the wrap-up; each later step reserves it: 2 steps + 1.5 s = 3.5 s.
    # Without the reserve a third step would fit the training budget and the step would take 4.5 s.
    assert [r.images_seen for r in report.steps[1:]] == [2, 2]
    assert [r.seconds for r in report.steps[1:]] == [pytest.approx(3.5)] * 2


@pytest.mark.slow
def test_an_announced_wrap_up_is_kept_inside_the_steps_own_budget(three_steps, tmp_path, fake_clock):
    """EWC/MAS's importance pass: the first later step has no measured wrap-up to reserve, so the
    images a strategy announces (``wrap_up_images``) are kept inside the step's own budget."""
    from everseg.learn.strategies.base import Strategy


    class AnnouncedWrapUp(Strategy):
        name = "announced-wrap-up"

        def before_forward(self, trainer, batch):
            fake_clock.advance(1.0)  # one (fake) second per training image

        def wrap_up_images(self, trainer):
            return 2

        def end_step(self, ctx, trainer):
            fake_clock.advance(2.0)  # the two images, at the training speed

    report = run_scenario(three_steps, [AnnouncedWrapUp()], tiny_cfg(**{"train.epochs": 5, "train.batch_size": 1}),
                          tmp_path / "run", progress=False, step_minutes=4.5 / 60)
    # 2 s kept for the wrap-up leave 2.5 s: 2 training images, then the wrap-up: 4 s in all. The
    # second step is not cut further for the first one's wrap-up: the reserve already covered it.
    assert [r.images_seen for r in report.steps[1:]] == [2, 2]
    assert [r.seconds for r in report.steps[1:]] == [pytest.approx(4.0)] * 2


@pytest.mark.slow
def test_later_steps_default_to_a_tenth_of_the_time_the_base_took(tiny_scenario, tmp_path, fake_clock):
    from everseg.learn.continual import default_step_minutes
    from everseg.learn.strategies.base import Strategy

    class Clocked(Strategy):
        name = "clocked"

        def before_forward(self, trainer, batch):
            fake_clock.advance(60.0)  # each training step takes one (fake) minute

    # Step 0: 8 epochs x 2 steps = 16 minutes. Step 1, with no budget given: 1.6 minutes, so
    # one step of a minute fits and a second (2 minutes in all) does not.
    report = run_scenario(tiny_scenario, [Clocked()], tiny_cfg(**{"train.epochs": 8}), tmp_path / "run",
                          progress=False)
    assert report.steps[0].seconds == pytest.approx(16 * 60)
    assert report.steps[1].images_seen == 4 and report.steps[1].seconds == pytest.approx(60)
    saved = load_config(tmp_path / "run" / "step1" / "config.yaml")
    assert saved.train.max_minutes == pytest.approx(1.6)
    # The step's model keeps the base's time, so a later `learn` budgets from it, not from the step's.
    meta = load_model(tmp_path / "run" / "step1" / "model").metadata
    assert meta["train_seconds"] == pytest.approx(16 * 60) and meta["step_seconds"] == pytest.approx(60)
    assert default_step_minutes(5.0) == 1.0  # at least a minute
    # Chosen budgets win: epochs alone are epochs, not a tenth of the time.
    report = run_scenario(tiny_scenario, [Clocked()], tiny_cfg(**{"train.epochs": 8}), tmp_path / "epochs",
                          progress=False, step_epochs=2)
    n = len(tiny_scenario.steps[1].train)
    assert report.steps[1].images_seen == 2 * ((n // 4) * 4 if n >= 4 else n)


def test_incremental_steps_train_at_their_share_of_the_lr(tiny_scenario, tmp_path):
    """optim.incremental_lr_factor scales later steps' peak LR, not step 0's nor a retraining's."""
    from everseg.learn.strategies.base import Strategy

    peaks: dict[int, float] = {}

    class PeakLR(Strategy):
        name = "peak-lr"

        def on_fit_start(self, trainer):
            peaks[self.ctx.step_index] = max(g.get("initial_lr", g["lr"]) for g in trainer.optimizer.param_groups)

    cfg = tiny_cfg(**{"optim.incremental_lr_factor": 0.1, "optim.lr": 0.02})
    run_scenario(tiny_scenario, [PeakLR()], cfg, tmp_path / "run", progress=False, step_epochs=1)
    assert peaks == {0: pytest.approx(0.02), 1: pytest.approx(0.002)}
    # A resumed step goes on with the config it began with: the scaled LR is in it.
    assert load_config(tmp_path / "run" / "step1" / "config.yaml", {}).optim.lr == pytest.approx(0.002)

    class RetrainingPeakLR(PeakLR):
        retrains = True

    peaks.clear()
    run_scenario(tiny_scenario, [RetrainingPeakLR()], cfg, tmp_path / "joint", progress=False, step_epochs=1)
    assert peaks == {0: pytest.approx(0.02), 1: pytest.approx(0.02)}


def test_incremental_steps_train_the_backbone_at_their_own_share_of_the_lr(tiny_scenario, tmp_path):
    """optim.incremental_backbone_lr_factor sets a later step's backbone LR (relative to the step's
    LR); step 0 keeps optim.backbone_lr_factor."""
    from everseg.learn.strategies.base import Strategy

    peaks: dict[int, dict[str, float]] = {}

    class GroupLR(Strategy):
        name = "group-lr"

        def on_fit_start(self, trainer):
            peaks[self.ctx.step_index] = {g["name"]: g.get("initial_lr", g["lr"])
                                          for g in trainer.optimizer.param_groups}

    cfg = tiny_cfg(**{"optim.lr": 0.02, "optim.incremental_lr_factor": 5, "optim.backbone_lr_factor": 0.5,
                      "optim.incremental_backbone_lr_factor": 0.05, "train.incremental_finetune": "full"})
    run_scenario(tiny_scenario, [GroupLR()], cfg, tmp_path / "run", progress=False, step_epochs=1)
    assert peaks[0]["backbone"] == pytest.approx(0.01) and peaks[0]["head"] == pytest.approx(0.02)
    assert peaks[1]["backbone"] == pytest.approx(0.005) and peaks[1]["head"] == pytest.approx(0.1)
    step1 = load_config(tmp_path / "run" / "step1" / "config.yaml", {})
    assert step1.optim.backbone_lr_factor == pytest.approx(0.05)


def _backbone_moved(before, after) -> bool:
    a, b = before.backbone.state_dict(), after.backbone.state_dict()
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_incremental_steps_train_the_backbone_as_incremental_finetune_says(tiny_scenario, tmp_path, mode):
    """Later steps keep the backbone (statistics included) by default and train it with
    train.incremental_finetune=full; step 0 trains it either way (train.finetune=full)."""
    over = {} if mode == "frozen" else {"train.incremental_finetune": mode}
    run_scenario(tiny_scenario, "finetune", tiny_cfg(**over), tmp_path / "run", progress=False, step_epochs=1)
    step0 = load_model(tmp_path / "run" / "step0" / "model")
    step1 = load_model(tmp_path / "run" / "step1" / "model")
    assert _backbone_moved(step0, step1) == (mode == "full")
    head0, head1 = step0.decoder.state_dict(), step1.decoder.state_dict()
    assert any(not torch.equal(head0[k], head1[k]) for k in head0)  # the decoder learned in both modes
    assert load_config(tmp_path / "run" / "step1" / "config.yaml", {}).train.finetune == mode
    assert load_config(tmp_path / "run" / "step0" / "config.yaml", {}).train.finetune == "full"


def test_a_later_step_trains_the_backbone_a_frozen_step_0_left_frozen(tiny_scenario, tmp_path):
    """train.finetune=frozen for step 0, train.incremental_finetune=full for the later steps."""
    cfg = tiny_cfg(**{"train.finetune": "frozen", "train.incremental_finetune": "full"})
    run_scenario(tiny_scenario, "finetune", cfg, tmp_path / "run", progress=False, step_epochs=1)
    step0 = load_model(tmp_path / "run" / "step0" / "model")
    assert _backbone_moved(step0, load_model(tmp_path / "run" / "step1" / "model"))

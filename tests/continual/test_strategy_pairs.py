"""Every pair of strategies means both: each one's effect on a real training step survives the other.

One step of camvid-6-5 (step 1 teaches new classes, so label 0 hides the old ones) with the
ce+dice recipe. For each pair, one batch goes through the Trainer's hooks exactly as in the
loop; then each strategy's own mark must be on that step: its loss term, its change to the
batch or to the segmentation loss, its state.
"""

import itertools

import pytest
import torch

from everseg.data import open_dataset
from everseg.data.protocols import get_protocol
from everseg.data.scenarios import build_scenario
from everseg.learn import Trainer, load_config
from everseg.learn.losses import LossShape
from everseg.learn.memory import ReplayMemory
from everseg.learn.optim import build_optimizer
from everseg.learn.plugins import StepOutput
from everseg.learn.strategies import STRATEGIES, build_strategies
from everseg.learn.strategies.base import ContinualContext
from everseg.models import create_model


@pytest.fixture(scope="module")
def step_setting(tiny_camvid):
    train = open_dataset(tiny_camvid, dataset="folder", split="train")
    test = open_dataset(tiny_camvid, dataset="folder", split="test")
    base, step = build_scenario(get_protocol("camvid-6-5"), train, test).steps
    torch.manual_seed(0)
    old = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=base.label_space, pretrained=False)
    # Batch-norm statistics of real images, as a trained model has: with the initial ones the
    # activations shrink layer by layer into denormal floats, and every forward pass takes seconds.
    images = torch.stack([base.train[i]["image"] for i in range(len(base.train))]).float() / 255
    with torch.no_grad():
        old.train()(images)
    return base, step, old.eval()


def run_one_batch(spec, step_setting, tmp_path):
    base, step, old = step_setting
    strategies = build_strategies(spec)
    memory = ReplayMemory(2, policy="reservoir")
    memory.update(base.train, step=0)
    ctx = ContinualContext(step=step, step_index=1, old_model=old, old_num_classes=base.label_space.num_classes)
    for s in strategies:
        if s.uses_memory:
            s.memory = memory
        s.begin_step(ctx)
    torch.manual_seed(1)
    model = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=step.label_space, pretrained=False)
    cfg = load_config(None, {"data.crop_size": [48, 64], "data.scale": [1.0, 1.0], "model.pretrained": False,
                             "train.batch_size": 2, "train.bf16": "off", "data.val_split": None,
                             "loss.kind": "ce+dice", "loss.class_weights": "inverse_sqrt"})
    trainer = Trainer(model, step.train, None, cfg, tmp_path, progress=False, write_run=False, plugins=strategies)
    trainer.optimizer = build_optimizer(model, cfg.optim)  # as fit() does before on_fit_start
    for s in strategies:
        s.on_fit_start(trainer)
    raw = next(iter(torch.utils.data.DataLoader(step.train, batch_size=2)))
    batch = trainer.to_batch(raw)
    given_mask = batch.mask.clone()
    for s in strategies:
        s.before_forward(trainer, batch)
    logits, features = model(batch.image, return_features=True)
    output = StepOutput(logits, features)
    for s in strategies:
        s.after_forward(trainer, batch, output)
    terms = trainer.loss_terms(batch, output)
    shape = LossShape()
    for s in strategies:
        s.shape_loss(trainer, batch, output, shape)
    return {s.name: s for s in strategies}, trainer, batch, given_mask, output, terms, shape


def mark_of(name, strategies, batch, given_mask, terms, shape):
    """Whether strategy ``name`` left its mark on the step."""
    if name == "replay":
        return batch.extra.get("replayed", 0) > 0 and batch.image.shape[0] > given_mask.shape[0]
    if name == "mer":  # its per-example steps over stored images ran before the loop's own step
        return "mer" in strategies and strategies["mer"].inner_steps > 0 and strategies["mer"]._start is not None
    if name == "reptile":  # it acts after the optimiser step
        return "reptile" in strategies and strategies["reptile"]._start is not None
    if name == "ewf":  # it holds the old classes' classifier rows; it fuses after training
        return "ewf" in strategies and strategies["ewf"]._rows is not None
    if name == "mib":  # background and camvid-6-5's first 6 classes are old
        return shape.background_covers == 7 and "mib_distill" in terms
    if name == "plop":
        return ("plop_pod" in terms and "plop" in shape.weighted_by
                and not torch.equal(batch.mask[: given_mask.shape[0]], given_mask))
    if name == "weighting":
        return "weighting" in shape.weighted_by and shape.image_weights.shape[0] == batch.image.shape[0]
    own = {"ilt": ("ilt_features", "ilt_output")}.get(name, (name,))  # ewc, mas, lwf, ilt: their own terms
    return all(t in terms and bool(torch.isfinite(terms[t])) for t in own)


REFUSED = {("mer", "replay"): "mer replays from its own memory"}  # the pairs that cannot mean both, and why


@pytest.mark.parametrize("pair", list(itertools.combinations(sorted(STRATEGIES), 2)), ids="+".join)
def test_a_pair_of_strategies_means_both(pair, step_setting, tmp_path):
    if pair in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[pair]):
            build_strategies("+".join(pair))
        return
    strategies, trainer, batch, given_mask, output, terms, shape = run_one_batch("+".join(pair), step_setting, tmp_path)
    for name in pair:
        assert mark_of(name, strategies, batch, given_mask, terms, shape), f"{name} lost in {'+'.join(pair)}"
    # The recipe's loss is still the recipe's: its Dice term and class weights are in the "seg" term.
    crit = trainer.criterion
    assert crit.kind == "ce+dice" and crit.class_weights is not None
    dice = crit.dice(output.logits, batch.mask, background_covers=shape.background_covers)
    seg = float(terms["seg"].detach())
    assert seg == pytest.approx(float(crit(output.logits, batch.mask, shape).detach()), rel=1e-6)
    assert seg > float(dice.detach()) > 0


def test_each_mark_is_its_strategys_own(step_setting, tmp_path):
    # The marks above are real: each strategy alone makes its own, plain fine-tuning makes none.
    for name in STRATEGIES:
        strategies, _, batch, given_mask, _, terms, shape = run_one_batch(name, step_setting, tmp_path)
        assert mark_of(name, strategies, batch, given_mask, terms, shape), name
    strategies, _, batch, given_mask, _, terms, shape = run_one_batch("finetune", step_setting, tmp_path)
    assert set(terms) == {"seg"} and shape.plain and list(strategies) == ["finetune"]
    assert not any(mark_of(n, strategies, batch, given_mask, terms, shape) for n in STRATEGIES)

"""Each strategy's term on tiny tensors, against values computed by hand from the papers' definitions."""

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from everseg.learn.strategies import build_strategies
from everseg.learn.strategies.distillation import output_distillation
from everseg.learn.losses import LossShape, SegmentationLoss
from everseg.learn.strategies.importance import EWC, MAS, per_sample_weights
from everseg.learn.strategies.mer import Reptile
from everseg.learn.strategies.mib import unbiased_distillation
from everseg.learn.strategies.plop import local_pod_loss, normalized_entropy, pod_embedding, pseudo_label


def unbiased_ce(old_classes, class_weights=None):
    """MiB's unbiased cross-entropy: the recipe's CE with label 0 standing for 0..old_classes-1."""
    loss = SegmentationLoss("ce", class_weights=class_weights)
    return lambda logits, target: loss(logits, target, LossShape(background_covers=old_classes))


def weighted_image_ce(logits, target, image_weights, class_weights):
    return SegmentationLoss("ce", class_weights=class_weights)(logits, target, LossShape(image_weights=image_weights))


def px(*values):
    """One pixel: a 1 x C x 1 x 1 logit tensor."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def test_lwf_is_cross_entropy_to_old_soft_outputs_on_old_classes():
    old = px(0.0, 0.0)  # q = (1/2, 1/2)
    new = px(math.log(3), 0.0, 5.0)  # on the old classes: p = (3/4, 1/4); the new class is left out
    expected = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert output_distillation(new, old).item() == pytest.approx(expected, rel=1e-6)
    # Temperature softens both sides: T = 2 halves the logits.
    expected_t = -(0.5 * math.log(math.sqrt(3) / (math.sqrt(3) + 1)) + 0.5 * math.log(1 / (math.sqrt(3) + 1)))
    assert output_distillation(new, old, temperature=2.0).item() == pytest.approx(expected_t, rel=1e-6)


def test_mib_unbiased_ce_merges_old_classes_into_background():
    logits = px(1.0, 2.0, 0.5)  # background, old class 1, new class 2
    z = math.exp(1) + math.exp(2) + math.exp(0.5)
    ce = unbiased_ce(2)
    bg = ce(logits, torch.zeros(1, 1, 1, dtype=torch.long)).item()
    assert bg == pytest.approx(-math.log((math.exp(1) + math.exp(2)) / z), rel=1e-6)
    new = ce(logits, torch.full((1, 1, 1), 2, dtype=torch.long)).item()
    assert new == pytest.approx(-math.log(math.exp(0.5) / z), rel=1e-6)
    ignored = ce(logits, torch.full((1, 1, 1), 255, dtype=torch.long)).item()
    assert ignored == 0.0


def test_mib_unbiased_ce_keeps_the_recipes_class_weights():
    # Two pixels: background (weight 1) and new class 2 (weight 4); the mean is weighted like F.cross_entropy's.
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]).T.reshape(1, 3, 1, 2)
    target = torch.tensor([[[0, 2]]])
    ce = unbiased_ce(2, torch.tensor([1.0, 9.0, 4.0]))
    nll_bg = -math.log((math.exp(1) + math.exp(2)) / (math.exp(1) + math.exp(2) + math.exp(0.5)))
    nll_new = -math.log(math.exp(3) / (2 + math.exp(3)))
    assert ce(logits, target).item() == pytest.approx((nll_bg + 4 * nll_new) / 5, rel=1e-6)
    # Without old classes in play it is exactly the weighted cross-entropy.
    plain = unbiased_ce(1, torch.tensor([1.0, 9.0, 4.0]))
    expected = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor([1.0, 9.0, 4.0]))
    assert plain(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mib_unbiased_distillation_merges_new_classes_into_background():
    old = px(0.0, math.log(3))  # q = (1/4, 3/4)
    new = px(0.0, 1.0, 2.0)
    p = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    expected = -(0.25 * math.log(p[0] + p[2]) + 0.75 * math.log(p[1])) / 2
    assert unbiased_distillation(new, old).item() == pytest.approx(expected, rel=1e-6)


def test_pod_embedding_and_loss_by_hand():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # squared [[1,4],[9,16]]: averaged along the width -> (2.5, 12.5), along the height -> (5, 10)
    torch.testing.assert_close(pod_embedding(f, scales=(1,))[0], torch.tensor([2.5, 12.5, 5.0, 10.0]))
    # C x (H + W) per window; at scale 2 a 5 x 7 map has windows of 2|3 rows and 3|4 columns.
    assert pod_embedding(torch.rand(1, 2, 5, 7), scales=(1,)).shape == (1, 24)
    assert pod_embedding(torch.rand(3, 2, 5, 7), scales=(1, 2)).shape == (3, 24 + 2 * (2 * (2 + 3) + 2 * (3 + 4)))
    assert local_pod_loss([f], [f.clone()]).item() == 0.0
    g = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2)
    dist = torch.linalg.vector_norm(pod_embedding(f, (1,)) - pod_embedding(g, (1,))).item()
    assert local_pod_loss([f], [g], scales=(1,)).item() == pytest.approx(dist)
    # Weighted per layer, averaged over layers.
    assert local_pod_loss([f, f], [g, f], scales=(1,), weights=[0.5, 3.0]).item() == pytest.approx(0.5 * dist / 2)


def test_plop_distils_the_logits_on_the_old_channels_with_the_step_schedule():
    from types import SimpleNamespace

    from everseg.learn.plugins import Batch, StepOutput
    from everseg.learn.strategies import PLOP
    from everseg.learn.strategies.base import ContinualContext
    from everseg.learn.strategies.plop import logits_as_old

    new = px(1.0, 2.0, 3.0, 4.0)
    torch.testing.assert_close(logits_as_old(new, 2), px(8.0, 2.0))  # background + the 2 new classes, class 1
    torch.manual_seed(0)
    feats = {"backbone": [torch.rand(1, 4, 4, 4)], "decoder": torch.rand(1, 3, 4, 4), "logits": torch.rand(1, 3, 4, 4)}
    old = {"backbone": [torch.rand(1, 4, 4, 4)], "decoder": torch.rand(1, 3, 4, 4), "logits": torch.rand(1, 2, 4, 4)}
    plop = PLOP(pod_weight=0.01, logits_weight=0.0005, scales=(1, 2))
    step = SimpleNamespace(new_classes=("Pole",), label_space=SimpleNamespace(names=("background", "Road", "Pole")))
    plop.begin_step(ContinualContext(step=step, step_index=1, old_model=nn.Identity(), old_num_classes=2))
    batch = Batch(torch.rand(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), ["x"],
                  extra={"plop_old_features": old})
    got = plop.loss_terms(None, batch, StepOutput(torch.rand(1, 3, 4, 4), feats))["plop_pod"]
    layers = local_pod_loss([feats["backbone"][0], feats["decoder"], logits_as_old(feats["logits"], 2)],
                            [old["backbone"][0], old["decoder"], old["logits"]], (1, 2), [0.01, 0.01, 0.0005])
    assert got.item() == pytest.approx(math.sqrt(3 / 1) * layers.item(), rel=1e-6)  # 3 classes now, 1 new


def test_plop_pseudo_labels_confident_background_only():
    # Pixel 0: background, old model sure of class 1 -> 1. Pixel 1: background, old model unsure -> ignore.
    # Pixel 2: labelled new class 3 -> unchanged. Image 2 has no background: its share is 1.
    old = torch.tensor([[[[-5.0, 0.0, 0.0]], [[5.0, 0.0, 0.0]]]]).repeat(2, 1, 1, 1)  # 2 x 2 x 1 x 3
    target = torch.tensor([[[0, 0, 3]], [[3, 3, 3]]])
    thresholds = torch.tensor([0.5, 0.5])
    assert normalized_entropy(old.softmax(1))[0, 0, 1].item() == pytest.approx(1.0)
    out, share = pseudo_label(target, old, thresholds)
    assert out.tolist() == [[[1, 255, 3]], [[3, 3, 3]]]
    assert share.tolist() == [0.5, 1.0]  # 1 of image 1's 2 background pixels was confident


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x, return_features=False):
        return self.conv(x)


def test_ewc_and_mas_penalties_are_importance_weighted_squared_distances():
    model = Tiny()
    for cls, scale in ((EWC, 0.5), (MAS, 1.0)):
        s = cls(weight=2.0)
        s.anchor = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        s.importance = {n: torch.full_like(p, 3.0) for n, p in model.named_parameters()}
        expected = sum((3.0 * p.detach().pow(2)).sum().item() for p in model.parameters())
        assert s.penalty(model).item() * s.weight == pytest.approx(2.0 * scale * expected, rel=1e-5)
    assert MAS.grad_to_importance(torch.tensor([-2.0])).item() == 2.0
    assert EWC.grad_to_importance(torch.tensor([-2.0])).item() == 4.0


def test_grown_classifier_only_old_rows_are_anchored():
    s = EWC(weight=2.0)
    p_old = torch.zeros(2, 4, 1, 1)
    s.anchor = {"w": p_old}
    s.importance = {"w": torch.ones_like(p_old)}

    class Grown(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, 4, 1, 1))

    assert s.penalty(Grown()).item() == pytest.approx(8.0)  # 2 old rows x 4 weights x (1 - 0)^2


def test_per_sample_weights_by_hand():
    w = per_sample_weights(torch.tensor([1.0, 3.0]), gamma=1.0)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(per_sample_weights(torch.tensor([1.0, 3.0]), gamma=0.0), torch.ones(2))


def test_sample_weighting_keeps_the_runs_class_weights():
    # Image 0: two pixels, classes 0 and 1; image 1: one pixel of class 1 and one ignored.
    logits = torch.zeros(2, 2, 1, 2)  # uniform: every pixel's CE is log 2
    target = torch.tensor([[[0, 1]], [[1, 255]]])
    l2 = math.log(2)
    # Without class weights each image's mean CE is log 2; image weights 0.5 and 1.5 average to 1.
    plain = weighted_image_ce(logits, target, torch.tensor([0.5, 1.5]), None)
    assert plain.item() == pytest.approx(l2)
    # Class weights (1, 3): image 0 = (1 l2 + 3 l2) / (1 + 3) = l2, image 1 = 3 l2 / 3 = l2;
    # with a skewed logit the weights matter: class-1 pixels cost log(1 + e).
    logits[:, 0] = 1.0
    lc1, lc0 = math.log(1 + math.e), math.log(1 + math.exp(-1))
    got = weighted_image_ce(logits, target, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0]))
    expected = ((1 * lc0 + 3 * lc1) / 4 + lc1) / 2
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_reptile_pulls_weights_back_towards_round_start():
    class FakeTrainer:
        def __init__(self):
            self.model = Tiny()
            self.global_step = 0

    tr = FakeTrainer()
    mer = Reptile(inner_steps=2, beta=0.5)
    mer.on_fit_start(tr)
    start = [p.detach().clone() for p in tr.model.parameters()]
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(1.0)
    tr.global_step = 1
    mer.after_step(tr, None, None)  # round not over: untouched
    torch.testing.assert_close(next(tr.model.parameters()), start[0] + 1.0)
    tr.global_step = 2
    mer.after_step(tr, None, None)
    for p, p0 in zip(tr.model.parameters(), start):
        torch.testing.assert_close(p, p0 + 0.5)


def test_mer_takes_per_image_steps_over_memory_and_meta_updates_as_published():
    """MER's Algorithm 1 on arithmetic: every optimiser step adds 1 to each weight, so where the
    weights end says which steps ran and which meta-updates pulled them back."""
    from everseg.learn.plugins import Batch
    from everseg.learn.strategies.mer import MetaExperienceReplay

    steps = []

    class FakeTrainer:
        def __init__(self):
            self.model = Tiny()

        def nested_step(self, batch):
            steps.append(batch.stems[0])
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(1.0)

    tr = FakeTrainer()
    mer = MetaExperienceReplay(batches=2, memory_per_batch=3, beta=0.5, gamma=0.5)
    mer.memory = ["stored"]  # not empty
    mer.memory_batch = lambda trainer, k, size: Batch(torch.zeros(k, 3, 4, 4), torch.zeros(k, 4, 4).long(), ["m"] * k)
    start = [p.detach().clone() for p in tr.model.parameters()]
    incoming = Batch(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4).long(), ["x"])
    mer.before_forward(tr, incoming)
    # batch 1: three stored images one at a time, then the incoming one; batch 2: three stored
    # images, the incoming one left to the loop's own step
    assert steps == ["m", "m", "m", "x", "m", "m", "m"] and mer.inner_steps == 7
    tr.nested_step(incoming)  # the loop's step
    mer.after_step(tr, incoming, None)
    # batch 1: +4 -> within-batch 0.5 -> +2; batch 2: +4 more -> 2 + 0.5 * 4 = +4; across-batch 0.5 -> +2
    for p, p0 in zip(tr.model.parameters(), start):
        torch.testing.assert_close(p, p0 + 2.0)


def test_strategy_names_compose():
    assert [s.name for s in build_strategies("plop+replay")] == ["replay", "plop"]
    assert [s.name for s in build_strategies("finetune")] == ["finetune"]
    assert [s.name for s in build_strategies("plop+mer")] == ["mer", "plop"]
    with pytest.raises(ValueError, match="mer replays from its own memory"):
        build_strategies("mer+replay")
    with pytest.raises(ValueError, match="unknown"):
        build_strategies("mib+magic")


def test_plop_thresholds_come_from_a_bounded_even_sample_of_the_step(tiny_camvid):
    from types import SimpleNamespace

    from everseg.data import open_dataset
    from everseg.learn.strategies import PLOP
    from everseg.learn.strategies.base import ContinualContext

    data = open_dataset(tiny_camvid, dataset="folder", split="train")  # 8 images
    seen = []

    class Old(nn.Module):
        def forward(self, x):
            seen.append(x.shape)
            return torch.zeros(1, 3, *x.shape[-2:])  # uniform: entropy 1 everywhere

    plop = PLOP(threshold_images=3)
    step = SimpleNamespace(new_classes=("b",), label_space=SimpleNamespace(names=("background", "a", "b")))
    plop.begin_step(ContinualContext(step=step, step_index=1, old_model=Old(), old_num_classes=3))
    plop.on_fit_start(SimpleNamespace(train_set=data, use_bf16=False, device=torch.device("cpu"),
                                      autocast=contextlib.nullcontext))
    assert len(seen) == 3  # images 0, 4 (rounded 3.5) and 7, not all 8
    assert plop.thresholds.tolist() == pytest.approx([1.0, 0.0, 0.0])  # argmax is class 0 everywhere


@pytest.mark.parametrize("names, new", [(("Sky", "Road"), ()), (("background", "Road"), ())])
def test_mib_and_plop_leave_label_0_alone_without_a_background_shift(names, new):
    """A domain step teaches no class: its label 0 (a domain scenario's Sky, or a real
    background) hides no old class, so neither the unbiased CE nor pseudo-labels apply."""
    from types import SimpleNamespace

    from everseg.learn.strategies import PLOP, MiB
    from everseg.learn.strategies.base import ContinualContext

    step = SimpleNamespace(new_classes=new, label_space=SimpleNamespace(names=names))
    ctx = ContinualContext(step=step, step_index=1, old_model=nn.Identity(), old_num_classes=2)
    assert not ctx.background_shift
    trainer = SimpleNamespace(config=SimpleNamespace(loss=SimpleNamespace(kind="ce")), train_set=SimpleNamespace(label_space=SimpleNamespace(ignore_index=255)))
    mib, plop = MiB(), PLOP()
    for s in (mib, plop):
        s.begin_step(ctx)
        s.on_fit_start(trainer)
    shape = LossShape()
    mib.shape_loss(trainer, None, None, shape)
    assert shape.plain and plop.thresholds is None
    shifted = ContinualContext(step=SimpleNamespace(new_classes=("Pole",),
                                                    label_space=SimpleNamespace(names=("background", "Road", "Pole"))),
                               step_index=1, old_model=nn.Identity(), old_num_classes=2)
    assert shifted.background_shift
    mib.begin_step(shifted)
    mib.shape_loss(trainer, None, None, shape)
    assert shape.background_covers == 2


def test_ewf_fuses_the_endpoints_and_keeps_the_new_rows():
    from types import SimpleNamespace

    from everseg.data.labelspace import LabelSpace
    from everseg.learn.strategies import EWF
    from everseg.learn.strategies.base import ContinualContext
    from everseg.models import create_model

    old_ls = LabelSpace(("background", "Road", "Sky"))
    new_ls = LabelSpace(("background", "Road", "Sky", "Pole"))
    torch.manual_seed(0)
    old = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=old_ls, pretrained=False).eval()
    model = copy.deepcopy(old)
    model.grow_classifier(new_ls, init="background")
    step = SimpleNamespace(new_classes=("Pole",), label_space=new_ls)
    ewf = EWF()
    ewf.begin_step(ContinualContext(step=step, step_index=1, old_model=old, old_num_classes=3))
    trainer = SimpleNamespace(model=model)
    ewf.on_fit_start(trainer)
    held = model.classifier.weight[:3].detach().clone()
    with torch.no_grad():  # "training": every weight moves
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ewf.after_step(trainer, None, None)
    torch.testing.assert_close(model.classifier.weight[:3], held)  # the old rows are held
    trained = copy.deepcopy(model)
    ewf.end_step(ewf.ctx, trainer)
    r = math.sqrt(1 / 4)  # one new class of four
    name, p_old = next(iter(old.named_parameters()))
    torch.testing.assert_close(dict(model.named_parameters())[name], (1 - r) * p_old + r * dict(trained.named_parameters())[name])
    torch.testing.assert_close(model.classifier.weight[3], trained.classifier.weight[3])  # the new row as trained
    torch.testing.assert_close(model.classifier.weight[:3], (1 - r) * old.classifier.weight + r * held)
    bn_old = dict(old.named_buffers())
    for key, value in model.named_buffers():
        if value.is_floating_point():
            torch.testing.assert_close(value, (1 - r) * bn_old[key] + r * dict(trained.named_buffers())[key])
    # A step of new data (no class added) keeps its model as trained.
    same = copy.deepcopy(trained)
    domain = EWF()
    domain.begin_step(ContinualContext(step=SimpleNamespace(new_classes=(), label_space=new_ls), step_index=1,
                                       old_model=old, old_num_classes=3))
    domain.on_fit_start(SimpleNamespace(model=same))
    domain.end_step(domain.ctx, SimpleNamespace(model=same))
    for a, b in zip(same.parameters(), trained.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [EWC, MAS])
def test_importance_is_the_mean_over_images_not_of_the_batch_gradient(cls):
    from types import SimpleNamespace

    from everseg.learn.plugins import Batch

    torch.manual_seed(0)
    model = Tiny()
    images = torch.rand(4, 3, 2, 2)
    masks = torch.tensor([0, 1, 0, 1]).view(4, 1, 1).expand(4, 2, 2).contiguous()  # labels that disagree
    data = [{"image": images[i], "mask": masks[i], "stem": str(i)} for i in range(4)]
    trainer = SimpleNamespace(train_set=data, to_batch=lambda raw: Batch(raw["image"], raw["mask"], list(raw["stem"])))
    strategy = cls(max_batches=1, batch_size=4)
    got = strategy._estimate(model, trainer, own_labels=False)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        strategy.sample_importance(model, Batch(images[i:i + 1], masks[i:i + 1], [str(i)]))
        for n, p in model.named_parameters():
            expected[n] += cls.grad_to_importance(p.grad) / 4
    for n in expected:
        torch.testing.assert_close(got[n], expected[n])
    # The batch's mean gradient would give less: the images pull in different directions.
    model.zero_grad()
    strategy.sample_importance(model, Batch(images, masks, list("0123")))
    batch_form = sum(float(cls.grad_to_importance(p.grad).sum()) for p in model.parameters())
    assert batch_form < sum(float(v.sum()) for v in expected.values())


def old_and_next_model(old_names, new_names):
    """A previous model (eval, frozen) and the next step's model made from it as a later step
    makes it: the classifier grown, the backbone frozen at the previous weights."""
    from everseg.data.labelspace import LabelSpace
    from everseg.models import create_model

    torch.manual_seed(0)
    old = create_model(arch="deeplabv3plus", backbone="mobilenet_v2", label_space=LabelSpace(old_names),
                       pretrained=False)
    for m in old.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    old.eval().requires_grad_(False)
    new = copy.deepcopy(old).requires_grad_(True).train()
    new.grow_classifier(LabelSpace(new_names))
    new.freeze_backbone()
    return old, new


def test_a_frozen_backbone_shared_with_the_old_model_is_not_run_twice():
    from types import SimpleNamespace

    from everseg.learn.plugins import StepOutput
    from everseg.learn.strategies.base import ContinualContext
    from everseg.learn.strategies.mib import MiB

    old, new = old_and_next_model(("bg", "a"), ("bg", "a", "b"))
    image = torch.rand(2, 3, 50, 70)  # not a multiple of the stride: the head pads as forward does
    logits, feats = new(image, return_features=True)
    mib = MiB()
    mib.begin_step(ContinualContext(step=None, step_index=1, old_model=old, old_num_classes=2))
    assert mib.needs_features
    trainer = SimpleNamespace(model=new)
    full = old(image)
    calls = []
    hook = old.backbone.register_forward_hook(lambda *a: calls.append(1))
    shared = mib.old_outputs(image, trainer=trainer, output=StepOutput(logits, feats))
    assert calls == [] and torch.allclose(shared, full, atol=1e-5)
    # The head gives forward's features too (PLOP, ILT).
    _, old_feats = old(image, return_features=True)
    calls.clear()
    _, head_feats = old.head(feats["backbone"], (50, 70), return_features=True)
    assert torch.allclose(head_feats["decoder"], old_feats["decoder"], atol=1e-5)
    # A backbone that trains (or has moved) is not shared: the old model runs whole.
    other = MiB()
    other.begin_step(ContinualContext(step=None, step_index=1, old_model=old, old_num_classes=2))
    new.freeze_backbone(False)
    assert torch.allclose(other.old_outputs(image, trainer=trainer, output=StepOutput(logits, feats)), full)
    assert calls == [1]
    new.freeze_backbone()
    with torch.no_grad():
        next(new.backbone.parameters()).add_(0.01)
    third = MiB()
    third.begin_step(ContinualContext(step=None, step_index=1, old_model=old, old_num_classes=2))
    third.old_outputs(image, trainer=trainer, output=StepOutput(logits, feats))
    hook.remove()
    assert calls == [1, 1]


def test_plop_pseudo_labels_after_the_forward_pass_from_the_shared_backbone():
    """PLOP relabels the masks after the forward pass, so that with a frozen backbone its old
    model runs only the decoder; the pseudo-labels and distilled features are the whole old
    model's."""
    from types import SimpleNamespace

    from everseg.learn.plugins import Batch, StepOutput
    from everseg.learn.strategies import PLOP
    from everseg.learn.strategies.base import ContinualContext

    old, new = old_and_next_model(("background", "a"), ("background", "a", "b"))
    image = torch.rand(2, 3, 48, 64)
    mask = torch.zeros(2, 48, 64, dtype=torch.long)
    mask[:, :8] = 2  # the new class; the rest is background
    step = SimpleNamespace(new_classes=("b",), label_space=new.label_space)
    plop = PLOP(batch_statistics=False)  # features as the old model computes them in eval mode
    plop.begin_step(ContinualContext(step=step, step_index=1, old_model=old, old_num_classes=2))
    assert plop.needs_features
    plop.thresholds = torch.tensor([0.9, 0.9])
    trainer = SimpleNamespace(model=new, train_set=SimpleNamespace(label_space=SimpleNamespace(ignore_index=255)))
    logits, feats = new(image, return_features=True)
    batch = Batch(image, mask.clone(), ["x", "y"])
    calls = []
    hook = old.backbone.register_forward_hook(lambda *a: calls.append(1))
    plop.after_forward(trainer, batch, StepOutput(logits, feats))
    hook.remove()
    assert calls == []
    old_logits, old_feats = old(image, return_features=True)
    expected, share = pseudo_label(mask, old_logits, plop.thresholds)
    assert torch.equal(batch.mask, expected) and not torch.equal(batch.mask, mask)
    assert torch.allclose(batch.extra["plop_confident_share"], share)
    assert torch.allclose(batch.extra["plop_old_features"]["decoder"], old_feats["decoder"], atol=1e-5)
    assert "plop_pod" in plop.loss_terms(trainer, batch, StepOutput(logits, feats))


@pytest.mark.parametrize("batch_statistics", [True, False])
def test_plop_distils_the_old_model_normalising_as_the_trained_one(batch_statistics):
    """The trained decoder normalises by each batch's statistics; PLOP runs the old one the same
    way for POD (not for its pseudo-labels), so that at unchanged weights the decoder's POD is 0,
    where the two kinds of statistics alone would make it large. The old model is left as it was."""
    from types import SimpleNamespace

    from everseg.learn.plugins import Batch, StepOutput
    from everseg.learn.strategies import PLOP
    from everseg.learn.strategies.base import ContinualContext

    old, new = old_and_next_model(("background", "a"), ("background", "a", "b"))
    before = copy.deepcopy(old.state_dict())
    step = SimpleNamespace(new_classes=("b",), label_space=new.label_space)
    plop = PLOP(batch_statistics=batch_statistics)
    plop.begin_step(ContinualContext(step=step, step_index=1, old_model=old, old_num_classes=2))
    plop.thresholds = torch.tensor([0.9, 0.9])
    trainer = SimpleNamespace(model=new, train_set=SimpleNamespace(label_space=SimpleNamespace(ignore_index=255)))
    image = torch.rand(4, 3, 64, 64)
    new.train()
    logits, feats = new(image, return_features=True)
    batch = Batch(image, torch.zeros(4, 64, 64, dtype=torch.long), list("abcd"))
    plop.after_forward(trainer, batch, StepOutput(logits, feats))
    pod = local_pod_loss([feats["decoder"]], [batch.extra["plop_old_features"]["decoder"]]).item()
    assert pod < 1e-4 if batch_statistics else pod > 1.0
    old_logits = old(image)  # pseudo-labels from the old model as it predicts
    assert torch.equal(batch.mask, pseudo_label(torch.zeros(4, 64, 64, dtype=torch.long), old_logits,
                                                plop.thresholds)[0])
    assert not any(m.training for m in old.modules())
    after = old.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "num_batches_tracked" not in k)


def test_pod_of_a_shared_tensor_counts_as_zero_in_the_mean():
    shared, new, old = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    skipped = local_pod_loss([shared, new], [shared, old], weights=[0.5, 2.0])
    computed = local_pod_loss([shared, new], [shared.clone(), old], weights=[0.5, 2.0])
    assert torch.allclose(skipped, computed) and skipped > 0


def window_pod_embedding(feature, scales):
    """POD embeddings window by window, as PLOP's authors compute them (the reference)."""
    x = feature.float().pow(2)
    n, c, h, w = x.shape
    parts = []
    for s in scales:
        hs, ws = max(1, h // s), max(1, w // s)
        for i in range(s):
            for j in range(s):
                win = x[:, :, i * hs:(i + 1) * hs if i < s - 1 else h, j * ws:(j + 1) * ws if j < s - 1 else w]
                if win.numel():
                    parts += [win.mean(3).flatten(1), win.mean(2).flatten(1)]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("shape, scales", [((2, 3, 9, 12), (1, 2, 4)), ((1, 2, 5, 7), (1, 2, 4)),
                                           ((2, 2, 3, 2), (1, 2, 4)), ((1, 4, 18, 24), (1, 3))])
def test_pod_embedding_holds_every_windows_means(shape, scales):
    """The same numbers as the window-by-window embedding (in another order), so the same
    distances and gradients, odd sizes and maps smaller than the grid included."""
    torch.manual_seed(0)
    new, old = torch.randn(*shape, requires_grad=True), torch.randn(*shape)
    mine, theirs = pod_embedding(new, scales), window_pod_embedding(new, scales)
    assert mine.shape == theirs.shape
    torch.testing.assert_close(mine.sort(dim=1).values, theirs.sort(dim=1).values)
    dist = torch.linalg.vector_norm(mine - pod_embedding(old, scales), dim=1).sum()
    (grad,) = torch.autograd.grad(dist, new)
    ref = torch.linalg.vector_norm(theirs - window_pod_embedding(old, scales), dim=1).sum()
    (ref_grad,) = torch.autograd.grad(ref, new)
    torch.testing.assert_close(dist, ref)
    torch.testing.assert_close(grad, ref_grad)

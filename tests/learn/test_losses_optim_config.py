import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from everseg.learn import (ConfigError, DiceLoss, LovaszSoftmaxLoss, SegmentationLoss, compute_class_weights,
                           load_config)
from everseg.learn.config import OptimConfig
from everseg.learn.optim import lr_multiplier


def test_ce_ignores_255_and_uses_class_weights():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # 1 x 2 classes x 1 x 2 pixels
    target = torch.tensor([[[0, 255]]])
    loss = SegmentationLoss("ce")(logits, target)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)))
    target = torch.tensor([[[0, 1]]])
    w = torch.tensor([1.0, 3.0])
    weighted = SegmentationLoss("ce", class_weights=w)(logits, target)
    l0, l1 = math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-1.0))
    assert weighted.item() == pytest.approx((1 * l0 + 3 * l1) / 4)


def test_dice_by_hand():
    # Perfectly confident logits: Dice reduces to the hard overlap.
    logits = torch.full((1, 2, 1, 4), -50.0)
    pred = torch.tensor([0, 0, 1, 1])
    logits[0, pred, 0, torch.arange(4)] = 50.0
    target = torch.tensor([[[0, 1, 1, 255]]])
    # pixel 3 is ignored. class 0: pred {0,1}, truth {0}: dice = 2*1/(2+1); class 1: pred {2}, truth {1,2}: 2/3
    expected = 1 - (2 / 3 + 2 / 3) / 2
    got = DiceLoss(smooth=0.0)(logits, target).item()
    assert got == pytest.approx(expected, abs=1e-5)
    assert SegmentationLoss("ce+dice", dice_weight=0.5)(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target, ignore_index=255).item() + 0.5 * DiceLoss()(logits, target).item(),
        abs=1e-5)


def test_dice_gradient_matches_the_one_hot_formulation():
    # The loss avoids a one-hot tensor for speed; the textbook form must give the same value
    # and gradient, and ignored pixels must get no gradient at all.
    torch.manual_seed(0)
    target = torch.randint(0, 5, (2, 6, 7))
    target[0, :2] = 255
    target[1, :, 3] = 4  # class 4 present; class set otherwise random

    def one_hot_dice(logits):
        valid = target != 255
        probs = logits.softmax(1) * valid.unsqueeze(1)
        onehot = F.one_hot(torch.where(valid, target, 0), 5).permute(0, 3, 1, 2) * valid.unsqueeze(1)
        inter, total = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))
        present = onehot.sum((0, 2, 3)) > 0
        return 1 - ((2 * inter + 1) / (total + 1))[present].mean()

    fast = torch.randn(2, 5, 6, 7, requires_grad=True)
    slow = fast.detach().clone().requires_grad_()
    DiceLoss()(fast, target).backward()
    one_hot_dice(slow).backward()
    torch.testing.assert_close(fast.grad, slow.grad)
    assert DiceLoss()(fast, target).item() == pytest.approx(one_hot_dice(slow).item(), abs=1e-6)
    assert fast.grad[0, :, :2].abs().max() == 0


def _confident(pred: list[int], classes: int) -> torch.Tensor:
    logits = torch.full((1, classes, 1, len(pred)), -50.0)
    logits[0, torch.tensor(pred), 0, torch.arange(len(pred))] = 50.0
    return logits


def test_lovasz_of_a_hard_prediction_is_one_minus_the_batch_iou():
    # At a vertex of the cube the Lovász extension is the set function itself: 1 - IoU,
    # averaged over the classes in the truth (class 2 is predicted but absent: not counted).
    logits = _confident([0, 0, 1, 1, 2], 3)
    target = torch.tensor([[[0, 1, 1, 255, 1]]])
    # class 0: truth {0}, predicted {0, 1}: IoU 1/2; class 1: truth {1, 2, 4}, predicted {2}: 1/3
    assert LovaszSoftmaxLoss()(logits, target).item() == pytest.approx(1 - (1 / 2 + 1 / 3) / 2, abs=1e-6)
    assert LovaszSoftmaxLoss()(_confident([0, 1, 1, 0, 1], 3), target).item() == pytest.approx(0.0, abs=1e-6)


def _lovasz_by_thresholds(probs: np.ndarray, labels: np.ndarray) -> float:
    """The extension as an integral over thresholds t of the Jaccard loss of {error >= t}."""
    losses = []
    for c in np.unique(labels):
        truth = labels == c
        errors = np.abs(truth - probs[c])
        order = np.argsort(-errors, kind="stable")
        e = np.append(errors[order], 0.0)
        value = 0.0
        for k in range(1, len(order) + 1):
            mistakes = np.zeros_like(truth)
            mistakes[order[:k]] = True
            value += (e[k - 1] - e[k]) * mistakes.sum() / (truth | mistakes).sum()
        losses.append(value)
    return float(np.mean(losses))


def test_lovasz_matches_its_threshold_integral_and_ignores_ignored_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, requires_grad=True)
    target = torch.randint(0, 4, (2, 3, 5))
    target[1, 0] = 255
    loss = LovaszSoftmaxLoss()(logits, target)
    valid = (target != 255).numpy()
    probs = logits.detach().softmax(1).permute(1, 0, 2, 3).numpy()[:, valid]
    assert loss.item() == pytest.approx(_lovasz_by_thresholds(probs, target.numpy()[valid]), abs=1e-5)
    loss.backward()
    assert logits.grad[1, :, 0].abs().max() == 0 and logits.grad.abs().sum() > 0
    empty = torch.randn(1, 3, 2, 2, requires_grad=True)
    none_valid = LovaszSoftmaxLoss()(empty, torch.full((1, 2, 2), 255))
    none_valid.backward()
    assert none_valid.item() == 0 and empty.grad is not None


def test_lovasz_on_a_pixel_grid_estimates_the_whole_batch():
    # Truth and logits constant on 2x2 blocks: every grid of every 2nd pixel sees the same
    # IoUs as the whole image, so the strided estimate is exact here.
    torch.manual_seed(1)
    target = torch.randint(0, 3, (2, 4, 4)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    logits = torch.randn(2, 3, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
    whole = LovaszSoftmaxLoss()(logits, target)
    for _ in range(4):
        assert LovaszSoftmaxLoss(max_pixels=32)(logits, target).item() == pytest.approx(whole.item(), abs=1e-6)


def test_lovasz_merges_old_classes_into_the_background_as_the_other_terms_do():
    target = torch.tensor([[[0, 0, 2, 2]]])
    logits = _confident([1, 0, 2, 2], 3)  # pixel 0: old class 1 where the step's truth says background
    assert LovaszSoftmaxLoss()(logits, target).item() == pytest.approx(1 - (1 / 2 + 1) / 2, abs=1e-6)
    assert LovaszSoftmaxLoss()(logits, target, background_covers=2).item() == pytest.approx(0.0, abs=1e-6)
    total = SegmentationLoss("ce+dice+lovasz", dice_weight=0.5, lovasz_weight=2.0)
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 1, 4)
    assert total(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target).item() + 0.5 * DiceLoss()(logits, target).item()
        + 2.0 * LovaszSoftmaxLoss()(logits, target).item(), abs=1e-5)
    assert SegmentationLoss("lovasz")(logits, target).item() == pytest.approx(
        LovaszSoftmaxLoss()(logits, target).item(), abs=1e-6)


def test_median_frequency_weights_by_hand():
    # 2 images x 3 classes; class 2 only in image 1.
    counts = np.array([[30, 10, 0], [20, 0, 20]])
    # freq(c) = pixels of c / pixels of images containing c
    freq = np.array([50 / 80, 10 / 40, 20 / 40])
    median = np.median(freq)
    w = compute_class_weights(counts, "median_frequency", max_weight=100).numpy()
    np.testing.assert_allclose(w, median / freq, rtol=1e-6)
    clipped = compute_class_weights(counts, "median_frequency", max_weight=1.5).numpy()
    assert clipped.max() == pytest.approx(1.5)
    assert compute_class_weights(counts, "none") is None
    with pytest.raises(ValueError, match="3 classes"):
        compute_class_weights(counts, [1.0, 2.0])


def test_schedules():
    cfg = OptimConfig(schedule="poly", poly_power=1.0, warmup_epochs=0)
    assert lr_multiplier(0, 10, 0, cfg) == pytest.approx(1.0)
    assert lr_multiplier(5, 10, 0, cfg) == pytest.approx(0.5)
    cfg = OptimConfig(schedule="cosine")
    assert lr_multiplier(2, 12, 2, cfg) == pytest.approx(1.0)
    assert lr_multiplier(7, 12, 2, cfg) == pytest.approx(0.5)
    assert lr_multiplier(0, 12, 2, cfg) == pytest.approx(0.5)  # warm-up: (0+1)/2


def test_warm_up_under_a_time_budget_keeps_its_share_of_time():
    cfg = OptimConfig(schedule="poly", poly_power=1.0, warmup_epochs=1)
    # Planned: 100 steps, 10 of them warm-up (10%). The budget, not the steps, will end it.
    assert lr_multiplier(0, 100, 10, cfg, time_progress=0.05) == pytest.approx(0.5)  # half the warm-up time
    # A step so short that one epoch outlasts the budget: past 10% of the time, decay, not warm-up.
    assert lr_multiplier(3, 100, 10, cfg, time_progress=0.5) == pytest.approx(0.5)
    assert lr_multiplier(3, 100, 10, cfg, time_progress=1.0) == pytest.approx(0.0)


def test_config_yaml_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.05\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, {"train.batch_size": 4, "data.crop_size": [64, 80]})
    assert cfg.optim.lr == 0.05 and cfg.train.epochs == 3 and cfg.train.batch_size == 4
    assert cfg.data.crop_size == (64, 80)
    path.write_text("optim:\n  lr_typo: 0.05\n")
    with pytest.raises(ConfigError, match=r"(?s)c\.yaml.*optim\.lr_typo"):
        load_config(path)
    path.write_text("model:\n  arch: segformer\n")
    with pytest.raises(ConfigError, match="unknown arch"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(None, {"model.aspp_rates": [3, 6, 9]}).model.aspp_rates == [3, 6, 9]
    lovasz = load_config(None, {"loss.kind": "ce+lovasz", "loss.lovasz_weight": 0.5}).loss
    assert (lovasz.kind, lovasz.lovasz_weight) == ("ce+lovasz", 0.5)
    with pytest.raises(ConfigError, match="loss.kind"):
        load_config(None, {"loss.kind": "lovasz+ce"})
    assert load_config(None, {"data.class_crops": 1}).data.class_crops == 1.0
    for bad in (1.5, -0.1, "often"):
        with pytest.raises(ConfigError, match="data.class_crops"):
            load_config(None, {"data.class_crops": bad})
    from everseg.learn.run import aspp_rates

    auto = load_config(None, {"model.aspp_rates": "auto", "data.crop_size": [288, 384]})
    assert aspp_rates(auto) == (3, 7, 10)
    with pytest.raises(ConfigError, match="aspp_rates"):
        load_config(None, {"model.aspp_rates": "wide"})
    with pytest.raises(ConfigError, match=r"list of positive ints such as \[3, 6, 9\], got \[0, 3\]$"):
        load_config(None, {"model.aspp_rates": [0, 3]})
    path.write_text("model:\n  arch: lraspp\n  aspp_rates: [3, 6, 9]\n")
    with pytest.raises(ConfigError, match="aspp_rates applies to deeplabv3"):
        load_config(path)


def test_time_budget_moves_the_decay_along():
    cfg = OptimConfig(schedule="poly", poly_power=1.0)
    assert lr_multiplier(1, 100, 0, cfg, time_progress=0.5) == pytest.approx(0.5)
    assert lr_multiplier(80, 100, 0, cfg, time_progress=0.5) == pytest.approx(0.2)  # steps are further
    # The warm-up's share of the time (2 of 100 planned steps) is long past: decay, not warm-up.
    assert lr_multiplier(0, 100, 2, cfg, time_progress=0.9) == pytest.approx(0.1)


def test_the_shaped_cross_entropy_is_torchs_when_nothing_is_shaped():
    """The path strategies shape (image weights, a merged background) computes the same loss as
    F.cross_entropy, class weights and label smoothing included, before anything is changed."""
    from everseg.learn.losses import LossShape

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, 0] = 255
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    loss = SegmentationLoss("ce", class_weights=weights, label_smoothing=0.1)
    expected = torch.nn.functional.cross_entropy(logits, target, weight=weights, ignore_index=255, label_smoothing=0.1)
    assert loss._shaped_ce(logits, target, LossShape()).item() == pytest.approx(expected.item(), rel=1e-5)
    # Image weights: each image's own weighted mean, weighted and averaged over images.
    per_image = [torch.nn.functional.cross_entropy(logits[i:i + 1], target[i:i + 1], weight=weights, ignore_index=255,
                                                   label_smoothing=0.1) for i in range(2)]
    shaped = loss(logits, target, LossShape(image_weights=torch.tensor([0.5, 1.5])))
    assert shaped.item() == pytest.approx((0.5 * per_image[0] + 1.5 * per_image[1]).item() / 2, rel=1e-5)
    # Two strategies' weights multiply; two different background merges are refused.
    shape = LossShape()
    shape.weight_images(torch.tensor([2.0, 1.0]), "a")
    shape.weight_images(torch.tensor([0.5, 3.0]), "b")
    assert shape.image_weights.tolist() == [1.0, 3.0] and shape.weighted_by == ["a", "b"]
    shape.merge_background(3, "mib")
    shape.merge_background(3, "again")
    with pytest.raises(ValueError, match="label 0 already stands for classes 0..2"):
        shape.merge_background(4, "other")


@pytest.mark.parametrize("value", ["0", "11", "nan", "abc"])
def test_incremental_lr_factor_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match="optim.incremental_lr_factor"):
        load_config(None, {"optim.incremental_lr_factor": value})
    assert load_config(None, {"optim.incremental_lr_factor": "10"}).optim.incremental_lr_factor == 10
    with pytest.raises(ConfigError, match="train.incremental_finetune"):
        load_config(None, {"train.incremental_finetune": "half"})


@pytest.mark.parametrize("kind", ["dice", "lovasz"])
def test_unbiased_overlap_terms_do_not_count_background_pixels_against_old_classes(kind):
    """Under MiB's background shift a pixel labelled 0 may be an old class. When an old class is
    present in the batch (replayed or pseudo-labelled pixels), predicting it on pixels labelled
    0 costs nothing more than predicting background there; a new class there still costs."""
    from everseg.learn.losses import LossShape

    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :2] = 1  # an old class, labelled (a replayed image)
    target[0, 6:] = 2  # the new class
    shape = LossShape()
    shape.merge_background(2, "mib")
    loss = SegmentationLoss(kind)

    def predicting(on_zero: int) -> float:
        logits = torch.zeros(1, 3, 8, 8)
        logits[0, 1, :2] = logits[0, 2, 6:] = 8.0
        logits[0, on_zero, 2:6] = 8.0
        return loss(logits, target, shape).item()

    assert predicting(1) == pytest.approx(predicting(0), abs=1e-4)
    assert predicting(2) > predicting(0) + 0.05

"""Bias offsets that match a new class's predicted pixels to its labelled ones (MiB's wrap-up)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from everseg.learn.calibration import MAX_OFFSET, PIXEL_STRIDE, count_matching_offsets, shift_class_biases


class PixelModel(nn.Module):
    """Logits from a 1x1 convolution of the colours: every pixel decided on its own."""

    def __init__(self, num_classes: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.classifier = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.classifier(x)


class Images:
    """Random images and masks, untransformed, as a dataset yields them."""

    def __init__(self, n: int, num_classes: int, seed: int = 0, ignore_share: float = 0.1):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            image = torch.randint(0, 256, (3, 16, 20), generator=g, dtype=torch.uint8)
            mask = torch.randint(0, num_classes, (16, 20), generator=g)
            mask[torch.rand(16, 20, generator=g) < ignore_share] = 255
            self.items.append({"image": image, "mask": mask})
        self.transform = None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def with_transform(self, transform):
        assert transform is None
        return self


def counts(model, data, c):
    """Predicted and labelled pixels of class ``c`` on the calibration's pixel sample."""
    pred = true = 0
    with torch.no_grad():
        for item in data.items:
            z = model(item["image"][None].float() / 255)[0][:, ::PIXEL_STRIDE, ::PIXEL_STRIDE]
            m = item["mask"][::PIXEL_STRIDE, ::PIXEL_STRIDE]
            keep = m != 255
            pred += int((z.argmax(0)[keep] == c).sum())
            true += int((m[keep] == c).sum())
    return pred, true


def test_one_class_is_predicted_on_as_many_pixels_as_it_holds():
    model, data = PixelModel(4), Images(6, 4)
    before, true = counts(model, data, 3)
    assert abs(before - true) > 20  # an untrained model is far off: something to correct
    offsets = count_matching_offsets(model, data, [3])
    shift_class_biases(model, offsets)
    after, _ = counts(model, data, 3)
    assert after == true
    assert count_matching_offsets(model, data, [3])[3] == pytest.approx(0.0, abs=1e-5)  # idempotent


def test_several_classes_converge_together():
    model, data = PixelModel(5, seed=1), Images(6, 5, seed=1)
    offsets = count_matching_offsets(model, data, [2, 3, 4])
    shift_class_biases(model, offsets)
    for c in (2, 3, 4):
        pred, true = counts(model, data, c)
        assert abs(pred - true) <= max(3, 0.03 * true), (c, pred, true)  # matched in turns: to a few pixels


def test_only_the_sampled_images_count():
    data = Images(10, 3)
    model = PixelModel(3)
    few = count_matching_offsets(model, data, [2], max_images=2)
    sample = SimpleNamespace(items=[data.items[0], data.items[5]])
    shift_class_biases(model, few)
    pred, true = counts(model, sample, 2)
    assert pred == true


def test_an_absent_class_gets_no_offset_and_a_hopeless_one_a_bounded_one():
    model, data = PixelModel(4), Images(4, 3)  # class 3 is in no mask
    assert count_matching_offsets(model, data, [3]) == {}
    with torch.no_grad():
        model.classifier.bias[2] -= 100.0  # class 2 never wins: no bounded shift matches it
    assert count_matching_offsets(model, data, [2])[2] == pytest.approx(MAX_OFFSET)


def test_mib_calibrates_the_new_classes_after_a_step_that_taught_them():
    """The hook as the runner fires it: the step's new class ends matched, the old ones untouched,
    and the pass is announced so the Trainer keeps time for it."""
    from everseg.learn.strategies import MiB
    from everseg.learn.strategies.base import ContinualContext

    model, data = PixelModel(4), Images(6, 4)
    step = SimpleNamespace(new_classes=("Pole",), new_ids=(3,),
                           label_space=SimpleNamespace(names=("background", "Road", "Car", "Pole")))
    ctx = ContinualContext(step=step, step_index=1, old_model=nn.Identity(), old_num_classes=3)
    trainer = SimpleNamespace(model=model, train_set=data, use_bf16=False,
                              config=SimpleNamespace(train=SimpleNamespace(channels_last=False)))
    old_bias = model.classifier.bias.detach().clone()
    off = MiB()
    off.begin_step(ctx)
    assert off.wrap_up_images(trainer) == 0
    off.end_step(ctx, trainer)
    assert torch.equal(model.classifier.bias, old_bias)
    mib = MiB(calibrate_images=4)
    mib.begin_step(ctx)
    assert mib.wrap_up_images(trainer) == 4
    mib.end_step(ctx, trainer)
    assert torch.equal(model.classifier.bias[:3], old_bias[:3]) and model.classifier.bias[3] != old_bias[3]
    sample = SimpleNamespace(items=[data.items[i] for i in (0, 2, 3, 4)])  # 4 of 6, spread: 0, 1.5, 3, 4.5
    pred, true = counts(model, sample, 3)
    assert pred == true
    with pytest.raises(ValueError, match="calibrate_images"):
        MiB(calibrate_images=-1)

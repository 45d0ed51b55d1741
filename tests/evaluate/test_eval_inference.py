"""Inference (whole / sliding window / TTA) and the evaluate() loop, with tiny stand-in models."""

from __future__ import annotations

import torch
import pytest
from torch import nn

from everseg.data.labelspace import LabelSpace
from everseg.evaluate import (ConfusionMatrix, EvaluationResult, evaluate, predict,
                              predict_logits, predict_probabilities)


class PixelModel(nn.Module):
    """A 1x1 convolution: every pixel is classified on its own, so the output is
    equivariant to translation and to horizontal flips."""

    def __init__(self, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Conv2d(3, num_classes, kernel_size=1)
        self.label_space = LabelSpace(tuple(f"c{i}" for i in range(num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class LeftBiasModel(PixelModel):
    """Adds a left-to-right ramp to class 0: not flip-equivariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x)
        ramp = torch.linspace(-2.0, 2.0, x.shape[-1], device=x.device)
        return out + torch.nn.functional.pad(ramp.expand(1, 1, *x.shape[-2:]),
                                             (0, 0, 0, 0, 0, out.shape[1] - 1))


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_whole_image_logits_are_the_model_output():
    model = PixelModel()
    x = images(2, 9, 11)
    with torch.no_grad():
        expected = model(x)
    out = predict_logits(model, x)
    assert out.shape == (2, 3, 9, 11) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    assert predict(model, x).dtype == torch.int64
    torch.testing.assert_close(predict(model, x), expected.argmax(1))


def test_uint8_and_single_images_are_accepted():
    model = PixelModel()
    x = (images(1, 6, 7) * 255).round().to(torch.uint8)
    out = predict_logits(model, x[0])
    assert out.shape == (3, 6, 7)
    torch.testing.assert_close(out, predict_logits(model, x.float() / 255)[0])
    assert predict(model, x[0]).shape == (6, 7)


@pytest.mark.parametrize("size", [(20, 27), (8, 10), (5, 7), (5, 30)])
def test_sliding_window_equals_whole_image_for_a_pixelwise_model(size):
    # (5, 7) is smaller than the crop in both directions, (5, 30) in one.
    model = PixelModel()
    x = images(2, *size)
    whole = predict_logits(model, x, mode="whole")
    slide = predict_logits(model, x, mode="slide", crop_size=(8, 10), stride=(5, 6))
    assert slide.shape == whole.shape
    torch.testing.assert_close(slide, whole)


def test_sliding_window_averages_overlapping_tiles():
    # A model that outputs 1 everywhere except at the tile's top-left pixel (0):
    # averaging by a count map must give values in [0, 1] and exactly 1 where
    # no tile has its corner.
    class Corner(nn.Module):
        def forward(self, x):
            out = torch.ones(x.shape[0], 2, *x.shape[-2:])
            out[:, :, 0, 0] = 0.0
            return out

    out = predict_logits(Corner(), images(1, 6, 6), mode="slide", crop_size=4, stride=2)
    # Tiles start at 0 and 2 on each axis: pixel (2, 2) is covered by 4 tiles, one with its corner.
    assert out[0, 0, 2, 2].item() == pytest.approx(0.75)
    assert out[0, 0, 0, 0].item() == 0.0
    assert out[0, 0, 5, 5].item() == 1.0


def test_bad_inference_options_raise():
    model, x = PixelModel(), images(1, 8, 8)
    with pytest.raises(ValueError):
        predict(model, x, mode="slide")  # no crop size
    with pytest.raises(ValueError):
        predict(model, x, mode="slide", crop_size=4, stride=5)
    with pytest.raises(ValueError):
        predict(model, x, mode="tiles")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        predict(model, x, scales=())


def test_flip_tta_changes_nothing_for_a_flip_symmetric_model():
    model = PixelModel()
    x = images(2, 7, 9)
    plain = predict_probabilities(model, x)
    flipped = predict_probabilities(model, x, flip=True)
    torch.testing.assert_close(flipped, plain)
    torch.testing.assert_close(plain, predict_logits(model, x).softmax(1))
    # With TTA, predict_logits gives log-probabilities of the averaged prediction.
    torch.testing.assert_close(predict_logits(model, x, flip=True).exp(), plain)


def test_flip_tta_averages_the_mirrored_prediction():
    model = LeftBiasModel()
    x = images(1, 5, 8)
    with torch.no_grad():
        a = model(x).softmax(1)
        b = model(x.flip(-1)).flip(-1).softmax(1)
    expected = (a + b) / 2
    out = predict_probabilities(model, x, flip=True)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, a)


def test_multi_scale_returns_input_size_and_is_consistent_on_flat_images():
    model = PixelModel()
    x = torch.full((1, 3, 9, 13), 0.3)  # flat image: resizing changes nothing
    out = predict_probabilities(model, x, scales=(0.5, 1.0, 1.5), flip=True)
    assert out.shape == (1, 3, 9, 13)
    torch.testing.assert_close(out, predict_probabilities(model, x))
    slide = predict_probabilities(model, x, mode="slide", crop_size=6, scales=(0.75, 1.25))
    torch.testing.assert_close(slide, out)


def test_bf16_autocast_channels_last_and_train_mode_restored():
    model = PixelModel().train()
    x = images(1, 8, 8)
    out = predict_logits(model, x, autocast_bf16=True, channels_last=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, predict_logits(model, x), atol=0.05, rtol=0.05)
    assert model.training  # mode restored


# ---------------------------------------------------------------------------- evaluate()
class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items, label_space=None):
        self.items = items
        if label_space is not None:
            self.label_space = label_space

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_items(sizes, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, (h, w) in enumerate(sizes):
        mask = torch.randint(0, num_classes, (h, w), generator=g)
        mask[torch.rand(h, w, generator=g) < 0.1] = 255
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        items.append({"image": image, "mask": mask, "stem": f"img{i}"})
    return items


SIZES = [(8, 8), (6, 10), (8, 8), (6, 10), (8, 8), (5, 5), (8, 8)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_evaluate_matches_per_image_prediction(batch_size):
    model = PixelModel()
    items = make_items(SIZES)
    expected = ConfusionMatrix(3)
    for it in items:
        expected.update(predict(model, it["image"]), it["mask"])
    batches = []
    result = evaluate(model, ListDataset(items), batch_size=batch_size, progress=False,
                      on_batch=lambda its, preds: batches.append((len(its), tuple(preds.shape))))
    assert isinstance(result, EvaluationResult)
    assert result.confusion.matrix.tolist() == expected.matrix.tolist()
    assert result.num_images == len(items) == sum(n for n, _ in batches)
    assert all(shape[0] <= batch_size for _, shape in batches)
    assert max(n for n, _ in batches) == min(batch_size, 4)  # four 8x8 images share batches
    assert result.seconds > 0 and result.images_per_second > 0
    assert result.label_space == model.label_space
    d = result.to_dict()
    assert d["num_images"] == len(items) and 0 <= d["miou"] <= 100
    assert d["settings"]["batch_size"] == batch_size


def test_evaluate_scores_a_perfect_model_at_100():
    class Oracle(nn.Module):
        """Reads the class from the red channel (red = 50 * class)."""

        def forward(self, x):
            red = x[:, :1] * 255.0
            centres = torch.arange(3, dtype=x.dtype).view(1, 3, 1, 1) * 50.0
            return -(red - centres) ** 2

    items = make_items([(6, 6), (4, 9)])
    for it in items:
        it["image"][0] = (it["mask"].clamp(max=2) * 50).to(torch.uint8)
    ls = LabelSpace(("a", "b", "c"))
    result = evaluate(Oracle(), ListDataset(items, ls), mode="slide", crop_size=4, stride=3,
                      flip=True, progress=False)
    assert result.metrics.miou == pytest.approx(100.0)
    assert result.metrics.num_pixels == sum(int((it["mask"] != 255).sum()) for it in items)


def test_evaluate_label_space_resolution():
    model = PixelModel(num_classes=3)  # classes c0, c1, c2
    items = make_items([(4, 4)], num_classes=2)
    # A dataset with fewer classes that the model's classes extend: fine.
    result = evaluate(model, ListDataset(items, LabelSpace(("c0", "c1"))), progress=False)
    assert result.label_space.names == ("c0", "c1", "c2")
    with pytest.raises(ValueError, match="disagree"):
        evaluate(model, ListDataset(items, LabelSpace(("x", "y"))), progress=False)
    # A label space smaller than the model's output cannot hold its predictions.
    with pytest.raises(ValueError):
        evaluate(model, ListDataset(items), label_space=LabelSpace(("c0", "c1")), progress=False)


def test_evaluate_rejects_mismatched_mask_and_bad_labels():
    model = PixelModel()
    items = make_items([(4, 4)])
    items[0]["mask"] = items[0]["mask"][:3]
    with pytest.raises(ValueError, match="img0"):
        evaluate(model, ListDataset(items), progress=False)
    items = make_items([(4, 4)])
    items[0]["mask"][0, 0] = 7
    with pytest.raises(ValueError):
        evaluate(model, ListDataset(items), progress=False)


def test_evaluate_plain_progress_and_max_images(capsys):
    model = PixelModel()
    result = evaluate(model, ListDataset(make_items(SIZES)), max_images=4, progress=True)
    assert result.num_images == 4
    err = capsys.readouterr().err
    assert "4/4 images" in err
def test_best_class_is_max_over_the_class_dimension_first_max_on_ties() -> None:
    from everseg.evaluate.inference import best_class

    for shape in [(11, 37, 41), (2, 5, 7, 9)]:
        x = torch.randn(*shape)
        values, ids = best_class(x)
        expected_values, expected_ids = x.max(dim=-3)
        assert torch.equal(values, expected_values) and torch.equal(ids, expected_ids)
    tied = torch.zeros(3, 4, 4)
    tied[1:] = 1.0
    assert (best_class(tied)[1] == 1).all()

"""Scores against a 3-class confusion matrix worked out by hand, and edge cases."""

from __future__ import annotations

import math
from fractions import Fraction as Fr

import numpy as np
import pytest
import torch

from everseg.data.labelspace import LabelSpace
from everseg.evaluate import ConfusionMatrix, SegmentationMetrics

# Rows = truth, columns = prediction.
#            p0 p1 p2     true pixels
#   t0     [ 3, 1, 0 ]    4
#   t1     [ 1, 2, 1 ]    4
#   t2     [ 0, 0, 2 ]    2
#   predicted 4  3  3     total 10,  TP = 3, 2, 2
HAND = [[3, 1, 0], [1, 2, 1], [0, 0, 2]]

# IoU = TP / (T + P - TP):  3/(4+4-3), 2/(4+3-2), 2/(2+3-2)
IOU = [Fr(3, 5), Fr(2, 5), Fr(2, 3)]
MIOU = Fr(5, 9)  # (3/5 + 2/5 + 2/3) / 3 = (1 + 2/3) / 3
# Dice = 2 TP / (T + P):  6/8, 4/7, 4/5
DICE = [Fr(3, 4), Fr(4, 7), Fr(4, 5)]
MEAN_DICE = Fr(99, 140)  # (105 + 80 + 112) / 140 / 3 = 297 / 420
PRECISION = [Fr(3, 4), Fr(2, 3), Fr(2, 3)]  # TP / P
RECALL = [Fr(3, 4), Fr(1, 2), Fr(1, 1)]  # TP / T
PIXEL_ACC = Fr(7, 10)
MEAN_CLASS_ACC = Fr(3, 4)  # (3/4 + 1/2 + 1) / 3
FWIOU = Fr(8, 15)  # 4/10 * 3/5 + 4/10 * 2/5 + 2/10 * 2/3 = 2/5 + 2/15


def pixels_from_matrix(matrix: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target) 1-D tensors with exactly these (truth, prediction) counts."""
    pred, target = [], []
    for t, row in enumerate(matrix):
        for p, count in enumerate(row):
            pred += [p] * count
            target += [t] * count
    return torch.tensor(pred), torch.tensor(target)


def assert_close(actual: float, expected: Fr) -> None:
    """Scores are percent; the hand-worked values are fractions."""
    assert actual == pytest.approx(100 * float(expected), abs=1e-10)


def test_hand_computed_three_class_example():
    pred, target = pixels_from_matrix(HAND)
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.tolist() == HAND
    assert cm.matrix.dtype == torch.int64
    m = cm.compute()
    for c in range(3):
        assert_close(m.iou[c], IOU[c])
        assert_close(m.dice[c], DICE[c])
        assert_close(m.precision[c], PRECISION[c])
        assert_close(m.recall[c], RECALL[c])
        assert_close(m.class_accuracy[c], RECALL[c])
    assert_close(m.miou, MIOU)
    assert_close(m.mean_dice, MEAN_DICE)
    assert_close(m.pixel_accuracy, PIXEL_ACC)
    assert_close(m.mean_class_accuracy, MEAN_CLASS_ACC)
    assert_close(m.fwiou, FWIOU)
    assert m.num_pixels == 10


def test_ignore_pixels_are_excluded():
    pred, target = pixels_from_matrix(HAND)
    # 2-D, with a row of ignore pixels whose predictions are all over the place.
    pred = torch.cat([pred, torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2, 0])]).reshape(2, 10)
    target = torch.cat([target, torch.full((10,), 255)]).reshape(2, 10)
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(pred, target)
    assert cm.matrix.tolist() == HAND
    assert_close(cm.compute().miou, MIOU)


def test_batches_accumulate_and_reset():
    pred, target = pixels_from_matrix(HAND)
    cm = ConfusionMatrix(3)
    cm.update(pred[:4], target[:4]).update(pred[4:], target[4:])
    assert cm.matrix.tolist() == HAND
    cm.reset()
    assert cm.num_pixels == 0


def test_absent_class_is_nan_and_left_out_of_the_means():
    # Class 3 appears in neither truth nor prediction.
    pred, target = pixels_from_matrix(HAND)
    m = ConfusionMatrix(4).update(pred, target).compute()
    assert math.isnan(m.iou[3]) and math.isnan(m.dice[3])
    assert math.isnan(m.precision[3]) and math.isnan(m.recall[3])
    assert_close(m.miou, MIOU)
    assert_close(m.mean_dice, MEAN_DICE)
    assert_close(m.mean_class_accuracy, MEAN_CLASS_ACC)
    assert_close(m.fwiou, FWIOU)
    d = m.to_dict()
    assert d["per_class_iou"]["3"] is None


def test_class_only_in_prediction_scores_zero_and_counts_in_the_mean():
    # One class-0 pixel predicted as class 3, which is absent from the truth.
    matrix = [[3, 1, 0, 1], [1, 2, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
    pred, target = pixels_from_matrix(matrix)
    m = ConfusionMatrix(4).update(pred, target).compute()
    assert m.iou[3] == 0.0 and m.dice[3] == 0.0 and m.precision[3] == 0.0
    assert math.isnan(m.recall[3])  # no true pixels: recall undefined
    # IoU0 = 3 / (5 + 4 - 3) = 1/2; mean over 4 defined classes.
    assert_close(m.iou[0], Fr(1, 2))
    assert_close(m.miou, (Fr(1, 2) + Fr(2, 5) + Fr(2, 3) + 0) / 4)
    # mean class accuracy only over classes present in the truth: 3/5, 1/2, 1.
    assert_close(m.mean_class_accuracy, (Fr(3, 5) + Fr(1, 2) + 1) / 3)


def test_empty_matrix_is_all_nan():
    m = ConfusionMatrix(2).compute()
    assert m.num_pixels == 0
    assert all(math.isnan(x) for x in (m.miou, m.mean_dice, m.pixel_accuracy, m.fwiou,
                                        m.mean_class_accuracy))


def test_from_confusion_accepts_numpy_and_rejects_bad_input():
    m = SegmentationMetrics.from_confusion(np.array(HAND))
    assert_close(m.miou, MIOU)
    with pytest.raises(ValueError):
        SegmentationMetrics.from_confusion(np.ones((2, 3)))
    with pytest.raises(ValueError):
        SegmentationMetrics.from_confusion(np.array([[1, -1], [0, 1]]))


def test_mean_iou_over_a_subset_of_classes():
    m = SegmentationMetrics.from_confusion(HAND)
    assert_close(m.mean_iou([0, 2]), (Fr(3, 5) + Fr(2, 3)) / 2)
    assert_close(m.mean_iou(), MIOU)
    with pytest.raises(IndexError):
        m.mean_iou([3])


def test_to_dict_gives_percentages_keyed_by_class_name():
    ls = LabelSpace(("road", "car", "sky"))
    d = SegmentationMetrics.from_confusion(HAND).to_dict(ls)
    assert d["miou"] == pytest.approx(100 * 5 / 9)
    assert d["pixel_accuracy"] == pytest.approx(70.0)
    assert d["fwiou"] == pytest.approx(100 * 8 / 15)
    assert d["mean_dice"] == pytest.approx(100 * 99 / 140)
    assert d["mean_class_accuracy"] == pytest.approx(75.0)
    assert d["per_class_iou"] == pytest.approx({"road": 60.0, "car": 40.0, "sky": 100 * 2 / 3})
    assert d["per_class_recall"]["sky"] == pytest.approx(100.0)
    assert d["per_class_precision"]["car"] == pytest.approx(100 * 2 / 3)
    assert d["per_class_dice"]["road"] == pytest.approx(75.0)
    assert d["num_pixels"] == 10
    with pytest.raises(ValueError):
        SegmentationMetrics.from_confusion(HAND).to_dict(LabelSpace(("a", "b")))

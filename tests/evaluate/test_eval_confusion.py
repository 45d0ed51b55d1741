"""ConfusionMatrix: label checks, merging, distributed reduction, torchmetrics cross-check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from everseg.evaluate import ConfusionMatrix


def test_target_label_outside_range_raises():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\[3\]"):
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 3, 255]))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 1]), torch.tensor([-1, 1]))
    with pytest.raises(ValueError):  # 254 is neither a class nor the ignore index
        cm.update(torch.tensor([0]), torch.tensor([254]))
    assert cm.num_pixels == 0  # nothing counted by the failed updates


def test_prediction_outside_range_and_bad_inputs_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        ConfusionMatrix(0)


def test_custom_ignore_index_and_numpy_inputs():
    cm = ConfusionMatrix(2, ignore_index=9)
    cm.update(np.array([[0, 1], [1, 1]], dtype=np.uint8), np.array([[0, 9], [1, 0]]))
    assert cm.matrix.tolist() == [[1, 1], [0, 1]]


def test_merge_and_add():
    a = ConfusionMatrix(2).update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    b = ConfusionMatrix(2).update(torch.tensor([1]), torch.tensor([1]))
    merged = a + b
    assert merged.matrix.tolist() == [[1, 1], [0, 1]]
    assert a.matrix.tolist() == [[1, 1], [0, 0]]  # inputs unchanged
    a += b
    assert a.matrix.tolist() == merged.matrix.tolist()
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(3))
    restored = ConfusionMatrix.from_state_dict(a.state_dict())
    assert restored.matrix.tolist() == a.matrix.tolist()


def test_reduce_is_a_no_op_without_distributed():
    cm = ConfusionMatrix(2).update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert cm.reduce_across_processes() is cm
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]


def test_reduce_with_a_single_process_group(tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        cm = ConfusionMatrix(2).update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        cm.reduce_across_processes()
        assert cm.matrix.tolist() == [[1, 1], [0, 1]]
    finally:
        dist.destroy_process_group()


def test_matches_torchmetrics_on_random_labels():
    pytest.importorskip("torchmetrics")
    from torchmetrics.classification import (MulticlassF1Score, MulticlassJaccardIndex,
                                             MulticlassPrecision, MulticlassRecall)
    from torchmetrics.segmentation import MeanIoU

    g = torch.Generator().manual_seed(0)
    n = 5
    target = torch.randint(0, n, (1, 24, 24), generator=g)
    # Mostly right, so that the scores are not all near 1/n.
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target,
                       torch.randint(0, n, target.shape, generator=g))
    m = ConfusionMatrix(n).update(pred, target).compute()
    assert len(np.unique(target)) == n  # every class present: no undefined values

    # MeanIoU has no ignore index; with one image its per-class IoU is the dataset IoU.
    tm_iou = MeanIoU(num_classes=n, per_class=True, input_format="index")(pred, target)
    np.testing.assert_allclose(m.iou, 100 * tm_iou.numpy(), rtol=1e-5)
    kwargs = dict(num_classes=n, average=None, ignore_index=255)
    np.testing.assert_allclose(m.iou, 100 * MulticlassJaccardIndex(**kwargs)(pred, target).numpy(), rtol=1e-5)
    np.testing.assert_allclose(m.dice, 100 * MulticlassF1Score(**kwargs)(pred, target).numpy(), rtol=1e-5)
    np.testing.assert_allclose(m.precision, 100 * MulticlassPrecision(**kwargs)(pred, target).numpy(), rtol=1e-5)
    np.testing.assert_allclose(m.recall, 100 * MulticlassRecall(**kwargs)(pred, target).numpy(), rtol=1e-5)


def test_matches_torchmetrics_jaccard_with_ignore_pixels():
    pytest.importorskip("torchmetrics")
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(1)
    n = 4
    target = torch.randint(0, n, (2, 16, 16), generator=g)
    pred = torch.randint(0, n, target.shape, generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    m = ConfusionMatrix(n).update(pred, target).compute()
    expected = MulticlassJaccardIndex(num_classes=n, average=None, ignore_index=255)(pred, target)
    np.testing.assert_allclose(m.iou, 100 * expected.numpy(), rtol=1e-5)

"""CamVid on the real files in ../shared/data/camvid (listing only, plus a few decodes)."""

from __future__ import annotations

import numpy as np
import pytest

from everseg.data import CAMVID_LABELS, IGNORE_INDEX, detect_dataset, load_camvid, open_dataset, read_mask

from data_testkit import CAMVID, need


@pytest.fixture(scope="module")
def camvid_root():
    return need(CAMVID, "the SegNet CamVid files: split sizes and sequences of the real dataset")


@pytest.mark.parametrize("split, count", [("train", 367), ("val", 101), ("test", 233), ("trainval", 468)])
def test_split_counts(camvid_root, split, count):
    ds = load_camvid(camvid_root, split, cache="none")
    assert len(ds) == count
    assert not ds.is_cached
    assert all(s.image.is_file() and s.mask.is_file() for s in ds.samples)


def test_sequences_are_groups(camvid_root):
    train = load_camvid(camvid_root, "train", cache="none")
    groups = {s.group for s in train.samples}
    assert groups == {"0001TP", "0006R0", "0016E5"}
    assert sum(s.group == "0001TP" for s in train.samples) == 62
    test = load_camvid(camvid_root, "test", cache="none")
    assert {s.group for s in test.samples} == {"0001TP", "Seq05VD"}


def test_class_ids_and_unlabelled_become_ignore(camvid_root):
    ds = open_dataset(camvid_root, dataset="camvid", split="val", cache="none")
    assert ds.label_space == CAMVID_LABELS and ds.label_space.num_classes == 11
    # a sample with unlabelled (11) pixels, checked against the raw file
    for i in range(0, len(ds), 25):
        raw = read_mask(ds.samples[i].mask)
        image, mask = ds.load(i)
        assert image.shape == (360, 480, 3) and image.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= set(range(11)) | {IGNORE_INDEX}
        assert (mask[raw == 11] == IGNORE_INDEX).all()
        keep = raw < 11
        assert (mask[keep] == raw[keep]).all()
    item = ds[0]
    assert item["image"].shape == (3, 360, 480) and item["mask"].dtype.is_floating_point is False


def test_detected_and_opened(camvid_root):
    assert detect_dataset(camvid_root) == "camvid"
    assert len(open_dataset(camvid_root, split="validation", cache="none")) == 101

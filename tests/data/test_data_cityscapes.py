"""Cityscapes in its real layout: labelIds -> 19 trainIds, cities as groups."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from data_testkit import camvid_as_train_ids, save
from everseg.data import CITYSCAPES_LABELS, DataError, detect_dataset, load_cityscapes, open_dataset
from everseg.data.cityscapes import CITYSCAPES_LABEL_IDS, label_ids_mapping


def test_official_table():
    assert len(CITYSCAPES_LABEL_IDS) == 34 and CITYSCAPES_LABELS.num_classes == 19
    assert CITYSCAPES_LABELS.names[0] == "road" and CITYSCAPES_LABELS.names[-1] == "bicycle"
    assert CITYSCAPES_LABELS.palette[10] == (70, 130, 180)  # sky
    raw = np.array([[7, 8, 26, 33, 24, 0, 9, 34, 200]], dtype=np.uint8)
    got = label_ids_mapping().apply(raw, "x.png")
    assert got.tolist() == [[0, 1, 13, 18, 11, 255, 255, 255, 255]]
    train_ids = [t for _, _, t in CITYSCAPES_LABEL_IDS if t != 255]
    assert sorted(train_ids) == list(range(19))


def test_train_and_val(cityscapes_root, camvid_crops):
    train = load_cityscapes(cityscapes_root, "train", cache="none")
    assert [s.stem for s in train.samples] == ["aachen_000000_000019", "aachen_000001_000019",
                                               "bochum_000002_000019"]
    assert [s.group for s in train.samples] == ["aachen", "aachen", "bochum"]
    for i in range(3):
        image, mask = train.load(i)
        assert image.shape == (30, 40, 3)
        assert (mask == camvid_as_train_ids(camvid_crops[i][2])).all()
    val = open_dataset(cityscapes_root, split="val", cache="none")
    assert len(val) == 1 and val.samples[0].group == "lindau"
    assert len(load_cityscapes(cityscapes_root, "trainval", cache="none")) == 4
    assert detect_dataset(cityscapes_root) == "cityscapes"


def test_train_ids_masks_preferred(cityscapes_root, tmp_path, camvid_crops):
    root = tmp_path / "cityscapes"
    shutil.copytree(cityscapes_root, root)
    for lid in (root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"):
        tid = camvid_as_train_ids(camvid_crops[3][2]).copy()
        tid[0, :] = 18  # differs from the labelIds file: proves which one is read
        save(lid.with_name(lid.name.replace("labelIds", "labelTrainIds")), tid)
    ds = load_cityscapes(root, "val", cache="none")
    assert ds.samples[0].mask.name.endswith("_gtFine_labelTrainIds.png")
    assert (ds.load(0)[1][0] == 18).all()
    # train has no trainIds files: labelIds are used there
    assert load_cityscapes(root, "train", cache="none").samples[0].mask.name.endswith("labelIds.png")


def test_test_split_is_refused(cityscapes_root):
    with pytest.raises(DataError, match="not public"):
        load_cityscapes(cityscapes_root, "test")


def test_pairing_problems(cityscapes_root, tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(cityscapes_root, root)
    img = root / "leftImg8bit" / "train" / "bochum" / "bochum_000002_000019_leftImg8bit.png"
    img.unlink()
    with pytest.raises(DataError) as err:
        load_cityscapes(root, "train")
    assert err.value.path.name == "bochum_000002_000019_gtFine_labelIds.png"
    assert "has no image" in str(err.value)

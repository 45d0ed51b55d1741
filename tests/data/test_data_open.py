"""open_dataset / detect_dataset / DATASET_READERS over every layout."""

from __future__ import annotations

import pytest

from everseg.data import (DATASET_READERS, DataError, available_splits, detect_dataset, load_ade20k,
                          load_camvid, load_cityscapes, load_folder, load_voc, open_dataset)


def test_readers_is_a_plain_dict():
    assert type(DATASET_READERS) is dict
    assert DATASET_READERS == {"camvid": load_camvid, "folder": load_folder, "voc": load_voc,
                               "cityscapes": load_cityscapes, "ade20k": load_ade20k}


@pytest.mark.parametrize("fixture, kind, splits", [
    ("isbi_folder", "folder", ["all"]),
    ("camvid_folder", "folder", ["train", "val"]),
    ("voc_root", "voc", ["train", "val", "train_aug"]),
    ("cityscapes_root", "cityscapes", ["train", "val"]),
    ("ade_root", "ade20k", ["train", "val"]),
])
def test_detect_and_open(request, fixture, kind, splits):
    root = request.getfixturevalue(fixture)
    assert detect_dataset(root) == kind
    assert available_splits(root) == splits
    for split in splits:
        ds = open_dataset(root, split=split, cache="none")
        assert len(ds) > 0
        ds2 = open_dataset(root, dataset=kind, split=split, cache="none")
        assert ds2.samples == ds.samples


def test_unknown_layout_and_kind(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError) as err:
        detect_dataset(tmp_path)
    assert err.value.path == tmp_path and "dataset=" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        open_dataset(tmp_path, dataset="kitti")


def test_kwargs_reach_the_dataset(isbi_folder):
    ds = open_dataset(isbi_folder, split="all", cache="memory")
    assert ds.is_cached and ds.memory_bytes() == 4 * 30 * 40 * 4

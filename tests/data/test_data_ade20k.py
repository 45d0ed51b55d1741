"""ADE20K (ADEChallengeData2016) in its real layout, with the zero label reduced."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from everseg.data import ADE20K_CLASSES, IGNORE_INDEX, DataError, detect_dataset, load_ade20k, open_dataset


def test_class_names():
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"


def test_reduce_zero_label(ade_root, camvid_crops):
    ds = load_ade20k(ade_root, "train", cache="none")
    assert len(ds) == 3 and ds.samples[0].stem == "ADE_train_00000001"
    assert ds.label_space.num_classes == 150
    _, mask = ds.load(1)
    raw = camvid_crops[1][2]
    expected = raw.copy()
    expected[raw == 11] = IGNORE_INDEX
    expected[0, 0] = 149
    assert (mask == expected).all()


@pytest.mark.parametrize("split", ["val", "validation"])
def test_val_split_names(ade_root, split):
    ds = open_dataset(ade_root, split=split, cache="none")
    assert [s.stem for s in ds.samples] == ["ADE_val_00000001"]
    assert len(load_ade20k(ade_root / "ADEChallengeData2016", split, cache="none")) == 1


def test_detect(ade_root):
    assert detect_dataset(ade_root) == "ade20k"
    assert detect_dataset(ade_root / "ADEChallengeData2016") == "ade20k"


def test_test_split_refused(ade_root):
    with pytest.raises(DataError, match="no public labels"):
        load_ade20k(ade_root, "test")


def test_value_above_150_names_the_file(ade_root, tmp_path):
    import shutil

    root = tmp_path / "ade"
    shutil.copytree(ade_root, root)
    path = root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png"
    m = np.asarray(Image.open(path)).copy()
    m[2, 2] = 151
    Image.fromarray(m).save(path)
    with pytest.raises(DataError) as err:
        load_ade20k(root, "val")
    assert err.value.path == path and "151" in str(err.value)

"""Pascal VOC 2012 in its real layout (palette PNG masks) plus the SBD train_aug set."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from data_testkit import voc_ids
from everseg.data import IGNORE_INDEX, VOC_LABELS, DataError, detect_dataset, load_voc, open_dataset


def test_labels():
    assert VOC_LABELS.num_classes == 21 and VOC_LABELS.names[0] == "background"
    assert VOC_LABELS.names[15] == "person" and VOC_LABELS.palette[15] == (192, 128, 128)


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_root_may_be_parent_devkit_or_voc2012(voc_root, sub):
    ds = load_voc(voc_root / sub if sub else voc_root, "train", cache="none")
    assert [s.stem for s in ds.samples] == ["2007_000000", "2007_000001", "2007_000002"]
    assert detect_dataset(voc_root / sub if sub else voc_root) == "voc"


def test_palette_masks_give_class_ids_and_border_is_ignore(voc_root, camvid_crops):
    ds = open_dataset(voc_root, split="val", cache="none")
    assert ds.label_space == VOC_LABELS
    mask_file = ds.samples[0].mask
    assert Image.open(mask_file).mode == "P"
    image, mask = ds.load(0)
    assert image.shape == (30, 40, 3)
    expected = voc_ids(camvid_crops[3][2])
    assert (mask == expected).all() and (mask == IGNORE_INDEX).any()
    assert len(load_voc(voc_root, "trainval", cache="none")) == 4


def test_train_aug(voc_root, camvid_crops):
    for name in ("train_aug", "trainaug", "aug"):
        ds = load_voc(voc_root, name, cache="none")
        assert len(ds) == 4 and ds.samples[-1].stem == "2008_000001"
        assert all(s.mask.parent.name == "SegmentationClassAug" for s in ds.samples)
    _, mask = ds.load(3)
    assert (mask == voc_ids(camvid_crops[0][2])[:, ::-1]).all()


def test_train_aug_list_next_to_voc2012(voc_root, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    seg = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    (seg / "train_aug.txt").rename(root / "train_aug.txt")
    assert len(load_voc(root / "VOCdevkit", "train_aug", cache="none")) == 4


def test_test_split_has_no_public_labels(voc_root):
    with pytest.raises(DataError, match="not public"):
        load_voc(voc_root, "test")


def test_missing_mask_names_the_image(voc_root, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "SegmentationClass" / "2007_000001.png").unlink()
    with pytest.raises(DataError) as err:
        load_voc(root, "train")
    assert err.value.path == voc / "JPEGImages" / "2007_000001.jpg"


def test_not_voc(tmp_path):
    with pytest.raises(DataError, match="does not look like Pascal VOC"):
        load_voc(tmp_path)

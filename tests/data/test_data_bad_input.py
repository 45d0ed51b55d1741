"""Real-world file quirks: each bad input gives a DataError naming the file; odd but valid
inputs (grayscale, 16-bit, palette, EXIF-rotated) are read correctly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_testkit import save, save_palette_png
from everseg.data import DataError, load_folder, read_image, read_mask


@pytest.fixture
def two_class(make_folder, isbi_crops):
    """A folder-format dataset of 2 ISBI crops with 0/1 index masks (3 classes declared)."""
    pairs = [(s, img, (m == 255).astype(np.uint8)) for s, img, m in isbi_crops[:2]]
    return make_folder("two", pairs, "membrane\ncell\nother\n")


def test_unreadable_image(two_class):
    bad = two_class / "images" / "1.png"
    bad.write_bytes(b"\x89PNG not really a png" + bytes(range(200)))
    with pytest.raises(DataError) as err:
        load_folder(two_class, "all")  # the default cache decodes everything up front
    assert err.value.path == bad and "cannot be read as an image" in str(err.value)
    ds = load_folder(two_class, "all", cache="none")  # lazily: the error comes with the sample
    ds.load(0)
    with pytest.raises(DataError) as err:
        ds[1]
    assert err.value.path == bad


def test_mask_of_another_size(two_class):
    mask = two_class / "masks" / "0.png"
    save(mask, np.zeros((31, 40), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        load_folder(two_class, "all", cache="none").load(0)
    assert err.value.path == mask and "40x31" in str(err.value) and "40x30" in str(err.value)


def test_label_values_outside_the_class_set(two_class):
    mask = two_class / "masks" / "1.png"
    m = np.asarray(Image.open(mask)).copy()
    m[3, 3], m[4, 4] = 7, 42
    save(mask, m)
    with pytest.raises(DataError) as err:
        load_folder(two_class, "all", cache="none").load(1)
    assert err.value.path == mask and "[7, 42]" in str(err.value)


def test_missing_pair(two_class):
    (two_class / "masks" / "0.png").unlink()
    with pytest.raises(DataError) as err:
        load_folder(two_class, "all")
    assert err.value.path == two_class / "images" / "0.png" and "has no mask" in str(err.value)


def test_grayscale_image_becomes_three_channels(two_class, isbi_crops):
    image, _ = load_folder(two_class, "all", cache="none").load(0)
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8
    assert (image[..., 0] == isbi_crops[0][1]).all() and (image[..., 0] == image[..., 2]).all()


def test_sixteen_bit_image_is_scaled(two_class, isbi_crops):
    gray = isbi_crops[0][1].astype(np.uint16) * 257  # 0..255 -> 0..65535
    path = two_class / "images" / "0.png"
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image, _ = load_folder(two_class, "all", cache="none").load(0)
    assert np.abs(image[..., 1].astype(int) - isbi_crops[0][1]).max() <= 1


def test_palette_png_mask_gives_indices(tmp_path):
    ids = np.arange(30 * 40, dtype=np.uint8).reshape(30, 40) % 5
    path = save_palette_png(tmp_path / "m.png", ids, [(9, 9, 9), (200, 0, 0), (0, 200, 0), (0, 0, 200), (1, 1, 1)])
    assert Image.open(path).mode == "P"
    assert (read_mask(path) == ids).all()


def test_exif_rotated_jpeg_matches_its_mask(make_folder, camvid_crops):
    stem, img, raw = camvid_crops[1]
    root = make_folder("exif", [(stem, img, (raw == 1).astype(np.uint8))], "other\nbuilding\n",
                       image_ext=".jpg")
    # Store the pixels rotated, with EXIF orientation 6 ("rotate 90 clockwise to view").
    stored = Image.fromarray(img).rotate(90, expand=True)
    assert stored.size == (30, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = root / "images" / f"{stem}.jpg"
    stored.save(path, quality=98, exif=exif)
    image, mask = load_folder(root, "all", cache="none").load(0)
    assert image.shape == (30, 40, 3) and mask.shape == (30, 40)
    assert np.abs(image.astype(int) - img.astype(int)).mean() < 8  # same picture, JPEG noise only
    assert read_image(path).shape == (30, 40, 3)

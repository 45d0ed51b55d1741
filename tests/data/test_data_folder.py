"""The generic folder format: classes.txt, split lists, the three mask encodings, everseg.yaml."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_testkit import CAMVID_NAMES, save, save_palette_png
from everseg.data import DataError, DataProblems, IGNORE_INDEX, load_folder, open_dataset

PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
           (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]


def expected_ids(raw: np.ndarray) -> np.ndarray:
    out = raw.copy()
    out[out == 11] = IGNORE_INDEX
    return out


# -- ISBI-EM: binary 0/255 masks -----------------------------------------------------------------
def test_isbi_binary_masks_become_two_classes(isbi_folder, isbi_crops):
    ds = load_folder(isbi_folder, "all", cache="none")
    assert ds.label_space.names == ("membrane", "cell")  # spaces, leading and trailing blank lines ignored
    assert [s.stem for s in ds.samples] == ["0", "1", "2", "10"]  # natural order
    assert all(s.group == "" for s in ds.samples)
    assert "auto-detected binary" in ds.mask_mapping.description
    for i, (_, gray, raw) in enumerate(isbi_crops):
        image, mask = ds.load(i)
        assert image.shape == (30, 40, 3)  # grayscale became 3 channels
        assert (image == gray[..., None]).all()
        assert set(np.unique(mask).tolist()) <= {0, 1}
        assert ((raw == 255) == (mask == 1)).all()
    # without split lists, "train" is every image too
    assert len(load_folder(isbi_folder, "train", cache="none")) == 4


def test_yaml_values_win_over_auto_detection(make_folder, isbi_crops):
    root = make_folder("isbi_swapped", isbi_crops[:2], "cell\nmembrane\n",
                       yaml_text="values: {0: membrane, 255: cell}\n")
    ds = load_folder(root, "all", cache="none")
    _, mask = ds.load(0)
    assert ((isbi_crops[0][2] == 255) == (mask == 0)).all()


def test_yaml_index_format_makes_255_ignore(make_folder, isbi_crops):
    root = make_folder("isbi_index", isbi_crops[:1], "a\nb\n", yaml_text="mask_format: index\n")
    _, mask = load_folder(root, "all", cache="none").load(0)
    assert set(np.unique(mask).tolist()) == {0, IGNORE_INDEX}
    # the argument wins over the yaml
    _, mask = load_folder(root, "all", mask_format="values", cache="none").load(0)
    assert set(np.unique(mask).tolist()) == {0, 1}


# -- index masks, split lists, groups ---------------------------------------------------------
def test_index_masks_with_split_lists_and_groups(camvid_folder, camvid_crops):
    train = load_folder(camvid_folder, "train", cache="none")
    val = open_dataset(camvid_folder, split="val", cache="none")
    assert [s.stem for s in train.samples] == [s for s, _, _ in camvid_crops[:3]]
    assert [s.stem for s in val.samples] == [camvid_crops[3][0]]  # "x.png" entry read as stem x
    assert train.samples[0].group == "0006R0" and val.samples[0].group == "0016E5"
    assert train.label_space.names == CAMVID_NAMES
    for i in range(3):
        _, mask = train.load(i)
        assert (mask == expected_ids(camvid_crops[i][2])).all()
    assert len(load_folder(camvid_folder, "all", cache="none")) == 4


def test_missing_split_list_is_a_clear_error(camvid_folder, isbi_folder):
    with pytest.raises(DataError) as err:
        load_folder(camvid_folder, "test")
    assert err.value.path == camvid_folder / "test.txt" and "no 'test' split" in str(err.value)
    with pytest.raises(DataError) as err:
        load_folder(isbi_folder, "val")
    assert err.value.path == isbi_folder / "val.txt" and "write val.txt" in str(err.value)
    assert "split=" not in str(err.value)  # no Python syntax in a message the command line shows


def test_list_entry_without_files_names_the_list(make_folder, isbi_crops):
    root = make_folder("badlist", isbi_crops[:2], "a\nb\n", lists={"train": "0\n\nnope\n0\n"})
    with pytest.raises(DataProblems) as err:
        load_folder(root, "train")
    msgs = [str(e) for e in err.value.errors]
    assert all(e.path == root / "train.txt" for e in err.value.errors)
    assert any("line 3: 'nope' has no image" in m for m in msgs)
    assert any("listed twice" in m for m in msgs)


def test_duplicate_class_names(make_folder, isbi_crops):
    root = make_folder("dupes", isbi_crops[:1], "road\nsky\n# a comment\nroad  \n")
    with pytest.raises(DataError) as err:
        load_folder(root, "all")
    assert err.value.path == root / "classes.txt" and "line 4: duplicate class name 'road'" in str(err.value)


def test_a_blank_line_between_classes_is_an_error_not_a_shift(make_folder, camvid_crops):
    # "line i = class id i": skipping the blank line would make Pole id 2 instead of 3.
    root = make_folder("blank", camvid_crops[:1], "Sky\nBuilding\n\nPole\n", yaml_text="ignore_values: [11]\n")
    with pytest.raises(DataError) as err:
        load_folder(root, "all")
    assert err.value.path == root / "classes.txt" and "line 3 is blank" in str(err.value)
    (root / "classes.txt").write_text("# CamVid\n\nSky\nBuilding\nPole\n\n\n")  # comments, edges: fine
    assert load_folder(root, "all", cache="none").label_space.names == ("Sky", "Building", "Pole")


def test_trainval_joins_train_and_val_lists_or_takes_all(camvid_folder, isbi_folder, make_folder, camvid_crops):
    both = load_folder(camvid_folder, "trainval", cache="none")
    assert [s.stem for s in both.samples] == [s for s, _, _ in camvid_crops]  # train.txt then val.txt
    assert len(load_folder(isbi_folder, "trainval", cache="none")) == 4  # no lists: every image
    stems = [s for s, _, _ in camvid_crops]
    only_train = make_folder("only_train", camvid_crops, "\n".join(CAMVID_NAMES) + "\n",
                             yaml_text="ignore_values: [11]\n", lists={"train": stems[0] + "\n",
                                                                       "test": stems[1] + "\n"})
    assert [s.stem for s in load_folder(only_train, "trainval", cache="none").samples] == [stems[0]]


def test_missing_classes_txt(make_folder, isbi_crops, tmp_path):
    root = make_folder("noclasses", isbi_crops[:1], "a\nb\n")
    (root / "classes.txt").unlink()
    with pytest.raises(DataError) as err:
        load_folder(root, "all")
    assert err.value.path == root / "classes.txt"


def test_missing_pairs_are_all_reported(make_folder, isbi_crops):
    root = make_folder("pairs", isbi_crops, "a\nb\n")
    (root / "masks" / "1.png").unlink()
    (root / "images" / "2.png").unlink()
    save(root / "masks" / "extra.jpg", isbi_crops[0][2])
    (root / "masks" / ".DS_Store").write_bytes(b"junk")  # hidden files are skipped
    with pytest.raises(DataProblems) as err:
        load_folder(root, "all")
    by_path = {e.path.name: e.problem for e in err.value.errors}
    assert set(by_path) == {"1.png", "2.png", "extra.jpg"}
    assert "has no mask" in by_path["1.png"] and "has no image" in by_path["2.png"]
    assert "PNG" in by_path["extra.jpg"]
    assert "and 2 more problems" in str(err.value)


def test_unknown_yaml_key(make_folder, isbi_crops):
    root = make_folder("typo", isbi_crops[:1], "a\nb\n", yaml_text="mask_fromat: index\n")
    with pytest.raises(DataError) as err:
        load_folder(root, "all")
    assert err.value.path == root / "everseg.yaml" and "mask_fromat" in str(err.value)


def test_group_regex_from_yaml(make_folder, isbi_crops):
    pairs = [(f"{seq}_{s}", img, m) for seq, (s, img, m) in zip(("seqA", "seqA", "seqB"), isbi_crops)]
    root = make_folder("groups", pairs, "a\nb\n", yaml_text="group: '^(seq[A-Z])_'\n")
    ds = load_folder(root, "all", cache="none")
    assert [s.group for s in ds.samples] == ["seqA", "seqA", "seqB"]


# -- RGB colour masks ---------------------------------------------------------------------------
def _rgb_pairs(camvid_crops):
    pal = np.array(PALETTE + [(0, 0, 0)], dtype=np.uint8)  # 11 (unlabelled) drawn black
    return [(s, img, pal[m]) for s, img, m in camvid_crops]


def test_rgb_masks_with_colours_in_classes_txt(make_folder, camvid_crops):
    classes = "".join(f"{n} {r} {g} {b}\n" for n, (r, g, b) in zip(CAMVID_NAMES, PALETTE))
    root = make_folder("rgb", _rgb_pairs(camvid_crops), classes, yaml_text="ignore_colors: [[0, 0, 0]]\n")
    ds = load_folder(root, "all", cache="none")
    assert ds.label_space.palette == tuple(PALETTE)
    for i, (_, _, raw) in enumerate(camvid_crops):
        assert (ds.load(i)[1] == expected_ids(raw)).all()


def test_rgb_masks_with_yaml_palette_by_name(make_folder, camvid_crops):
    pal = "\n".join(f"  {n}: [{r}, {g}, {b}]" for n, (r, g, b) in zip(CAMVID_NAMES, PALETTE))
    root = make_folder("rgb_yaml", _rgb_pairs(camvid_crops)[:2], "\n".join(CAMVID_NAMES),
                       yaml_text=f"palette:\n{pal}\nignore_colors: ['#000000']\n")
    ds = load_folder(root, "all", cache="none")
    assert (ds.load(1)[1] == expected_ids(camvid_crops[1][2])).all()


def test_rgb_mask_with_unknown_colour_names_the_mask(make_folder, camvid_crops):
    pairs = _rgb_pairs(camvid_crops)[:2]
    bad = pairs[1][2].copy()
    bad[5, 7] = (1, 2, 3)
    pairs[1] = (pairs[1][0], pairs[1][1], bad)
    classes = "".join(f"{n} {r} {g} {b}\n" for n, (r, g, b) in zip(CAMVID_NAMES, PALETTE))
    root = make_folder("rgb_bad", pairs, classes, yaml_text="ignore_colors: [[0, 0, 0]]\n")
    ds = load_folder(root, "all", cache="none")
    with pytest.raises(DataError) as err:
        ds.load(1)
    assert err.value.path == root / "masks" / f"{pairs[1][0]}.png"
    assert "(1, 2, 3)" in str(err.value)


def test_rgb_mask_that_is_all_gray_still_maps(make_folder, isbi_crops):
    # A colour mask holding only black and gray is collapsed to one channel by read_mask.
    img = isbi_crops[0][1]
    rgb = np.zeros((30, 40, 3), dtype=np.uint8)
    rgb[:, 20:] = (128, 128, 128)
    root = make_folder("gray_rgb", [("x", img, rgb)], "bg 0 0 0\nthing 128 128 128\n")
    Image.fromarray(rgb).save(root / "masks" / "x.png")  # stored as RGB
    _, mask = load_folder(root, "all", mask_format="rgb", cache="none").load(0)
    assert (mask[:, :20] == 0).all() and (mask[:, 20:] == 1).all()


def test_colour_masks_without_colours_are_an_error(make_folder, camvid_crops):
    root = make_folder("rgb_nocolours", _rgb_pairs(camvid_crops)[:1], "\n".join(CAMVID_NAMES))
    with pytest.raises(DataError) as err:
        load_folder(root, "all")
    assert err.value.path == root / "masks" / f"{camvid_crops[0][0]}.png"
    assert "gives no colours" in str(err.value)


def test_palette_pngs_with_colours_read_as_index(make_folder, camvid_crops):
    classes = "".join(f"{n} {r} {g} {b}\n" for n, (r, g, b) in zip(CAMVID_NAMES, PALETTE))
    stem, img, raw = camvid_crops[2]
    root = make_folder("palette", [(stem, img, raw)], classes)
    save_palette_png(root / "masks" / f"{stem}.png", raw, PALETTE + [(0, 0, 0)] * 245)
    ds = load_folder(root, "all", cache="none")
    # 11 is neither a class nor ignore here: the error names the mask and says how to map it
    with pytest.raises(DataError) as err:
        ds.load(0)
    assert err.value.path == root / "masks" / f"{stem}.png" and "[11]" in str(err.value)
    (root / "everseg.yaml").write_text("ignore_values: [11, 255]\n")
    assert (load_folder(root, "all", cache="none").load(0)[1] == expected_ids(raw)).all()


def test_sixteen_bit_masks_keep_their_values(make_folder, isbi_crops):
    stem, img, raw = isbi_crops[0]
    ids = (raw == 255).astype(np.uint16) * 2  # class ids 0 and 2
    ids[0, :5] = 1
    root = make_folder("mask16", [(stem, img, raw)], "a\nb\nc\n")
    Image.fromarray(ids).save(root / "masks" / f"{stem}.png")
    assert Image.open(root / "masks" / f"{stem}.png").mode.startswith("I")
    _, mask = load_folder(root, "all", cache="none").load(0)
    assert (mask == ids).all()
    # a 16-bit value table, e.g. instance-style large values
    Image.fromarray(ids * 1000).save(root / "masks" / f"{stem}.png")
    (root / "everseg.yaml").write_text("values: {0: 0, 1000: 1, 2000: 2}\n")
    assert (load_folder(root, "all", cache="none").load(0)[1] == ids).all()

"""Scenarios on real layouts: step image selection, background shift, ignore kept, protocols."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from everseg.data import DataError, open_dataset
from everseg.data.protocols import PROTOCOLS, get_protocol
from everseg.data.scenarios import ScenarioSpec, StepSpec, build_scenario
from everseg.samples import camvid_mini

MINI = camvid_mini()


@pytest.fixture(scope="module")
def mini():
    return open_dataset(MINI, dataset="folder", split="train"), open_dataset(MINI, dataset="folder", split="test")


def test_camvid_6_5_background_shift_and_ignore(mini):
    train, test = mini
    sc = build_scenario(get_protocol("camvid-6-5"), train, test)
    assert sc.synthetic_background
    names = sc.final_label_space.names
    assert names == ("background", "Sky", "Building", "Road", "Pavement", "Tree", "Car", "Pole",
                     "SignSymbol", "Fence", "Pedestrian", "Bicyclist")
    assert sc.final_label_space.taught_at == (0,) * 7 + (1,) * 5
    s0, s1 = sc.steps
    assert s0.label_space.num_classes == 7 and s1.label_space.num_classes == 12
    assert s0.old_ids == () and s0.new_ids == (1, 2, 3, 4, 5, 6)
    assert s1.old_ids == (1, 2, 3, 4, 5, 6) and s1.new_ids == (7, 8, 9, 10, 11)
    pole = train.label_space.index("Pole")
    for k in range(len(s1.train)):
        i = train.samples.index(s1.train.samples[k])
        _, raw = train.decoded(i)
        _, shifted = s1.train.decoded(k)
        # Only the step's classes stay labelled; old classes become background; ignore stays ignore.
        assert set(np.unique(shifted)) <= {0, 7, 8, 9, 10, 11, 255}
        np.testing.assert_array_equal(shifted == 255, raw == 255)
        np.testing.assert_array_equal(shifted == 7, raw == pole)
    _, t0 = s0.tests["all"].decoded(0)
    _, t_raw = test.decoded(0)
    # Step-0 test masks: future classes are background, learned classes keep their (new) ids.
    assert set(np.unique(t0)) <= {0, 1, 2, 3, 4, 5, 6, 255}
    np.testing.assert_array_equal(t0 == 3, t_raw == train.label_space.index("Road"))


def test_overlap_and_disjoint_select_different_images(mini):
    train, test = mini
    base = ("Sky", "Building", "Road", "Pavement", "Tree", "Car")
    new = ("Pole", "SignSymbol", "Fence", "Pedestrian", "Bicyclist")
    presence = train.class_pixel_counts(per_image=True) > 0
    new_cols = [train.label_space.index(c) for c in new]
    for setting in ("overlap", "disjoint"):
        spec = ScenarioSpec("t", "class", (StepSpec(base, setting=setting), StepSpec(new, setting=setting)))
        if setting == "disjoint" and presence[:, new_cols].any(1).all():
            with pytest.raises(DataError, match="no training image"):
                build_scenario(spec, train, test)
            continue
        sc = build_scenario(spec, train, test)
        stems0 = {s.stem for s in sc.steps[0].train.samples}
        idx = {s.stem: i for i, s in enumerate(train.samples)}
        if setting == "overlap":
            assert len(stems0) == presence[:, [train.label_space.index(c) for c in base]].any(1).sum()
        else:
            assert not any(presence[idx[s], new_cols].any() for s in stems0)


def test_user_yaml_scenario_with_stems_and_errors(mini, tmp_path):
    train, test = mini
    stems = [s.stem for s in train.samples[:10]]
    (tmp_path / "first.txt").write_text("\n".join(stems) + "\n")
    path = tmp_path / "s.yaml"
    path.write_text("name: mine\nsteps:\n  - classes: [Road, Sky]\n    images: first.txt\n"
                    "  - classes: [Car]\n    setting: disjoint\n")
    spec = ScenarioSpec.from_yaml(path)
    sc = build_scenario(spec, train, test, base_dir=tmp_path)
    assert {s.stem for s in sc.steps[0].train.samples} <= set(stems)
    assert sc.final_label_space.names == ("background", "Road", "Sky", "Car")
    path.write_text("steps:\n  - classes: [Road]\n  - classes: [Road]\n")
    with pytest.raises(DataError, match="again"):
        ScenarioSpec.from_yaml(path)
    path.write_text("steps:\n  - classes: [Road]\n  - classes: [Unicorn]\n")
    with pytest.raises(DataError, match="Unicorn"):
        build_scenario(ScenarioSpec.from_yaml(path), train, test)
    path.write_text("steps:\n  - classes: [Road]\n    setting: sideways\n")
    with pytest.raises(DataError, match="setting"):
        ScenarioSpec.from_yaml(path)


def test_camvid_domains_by_sequence(mini):
    train, test = mini
    sc = build_scenario(get_protocol("camvid-domains"), train, test)
    assert [len(s.train) for s in sc.steps] == [24, 20, 16]
    assert {s.samples[0].group for s in (sc.steps[2].train,)} == {"0001TP"}
    assert set(sc.steps[0].tests) == {"day", "dusk"}
    assert all(s.group == "Seq05VD" for s in sc.steps[0].tests["day"].samples)
    assert sc.steps[1].old_ids == tuple(range(11)) and sc.steps[0].new_ids == tuple(range(11))


def _voc_fixture(root: Path) -> Path:
    """VOC layout with masks designed so each protocol step has known images."""
    voc = root / "VOCdevkit" / "VOC2012"
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    content = {"a": [1], "b": [5, 16], "c": [17], "d": [20], "e": [3, 18], "f": [19], "g": [1, 16, 20]}
    for stem, classes in content.items():
        mask = np.zeros((16, 16), np.uint8)
        for k, c in enumerate(classes):
            mask[k * 4:(k + 1) * 4, 2:10] = c
        mask[:, 15] = 255
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
        for folder in ("SegmentationClassAug", "SegmentationClass"):
            (voc / folder).mkdir(exist_ok=True)
            Image.fromarray(mask).save(voc / folder / f"{stem}.png")
    (seg / "train_aug.txt").write_text("a\nb\nc\nd\ne\nf\n")
    (seg / "train.txt").write_text("a\nb\nc\nd\ne\nf\n")
    (seg / "val.txt").write_text("g\n")
    return root


def test_voc_15_5_overlap_vs_disjoint(tmp_path):
    root = _voc_fixture(tmp_path)
    train = open_dataset(root, dataset="voc", split="train_aug")
    val = open_dataset(root, dataset="voc", split="val")
    over = build_scenario(get_protocol("voc-15-5-overlap"), train, val)
    dis = build_scenario(get_protocol("voc-15-5-disjoint"), train, val)
    assert not over.synthetic_background
    assert over.final_label_space.names == train.label_space.names  # background + 20 in VOC order
    stems = lambda sc, t: sorted(s.stem for s in sc.steps[t].train.samples)  # noqa: E731
    assert stems(over, 0) == ["a", "b", "e"] and stems(dis, 0) == ["a"]
    assert stems(over, 1) == ["b", "c", "d", "e", "f"]
    # Step 1 of overlap: bottle (5) in image b is background now; pottedplant (16) stays.
    k = [s.stem for s in over.steps[1].train.samples].index("b")
    _, m = over.steps[1].train.decoded(k)
    assert set(np.unique(m)) == {0, 16, 255}
    assert over.steps[1].old_ids[0] == 0 and over.steps[0].new_ids[0] == 0  # background is scored
    _, t0 = over.steps[0].tests["all"].decoded(0)
    assert set(np.unique(t0)) == {0, 1, 255}  # 16 and 20 not learned yet -> background


def test_camvid_10_1_disjoint_keeps_bicyclists_out_of_the_base(mini):
    train, test = mini
    bicyclist = train.label_space.index("Bicyclist")
    with_one = set(np.flatnonzero(train.class_pixel_counts(per_image=True)[:, bicyclist] > 0))
    assert 0 < len(with_one) < len(train)  # else the sample could not tell the settings apart
    base = {}
    for setting in ("overlap", "disjoint"):
        sc = build_scenario(get_protocol(f"camvid-10-1-{setting}"), train, test)
        assert sc.final_label_space.names[-1] == "Bicyclist" and len(sc.steps) == 2
        base[setting] = {train.samples.index(s) for s in sc.steps[0].train.samples}
        assert {train.samples.index(s) for s in sc.steps[1].train.samples} == with_one
    assert base["disjoint"] == base["overlap"] - with_one and base["overlap"] & with_one


def test_every_protocol_is_well_formed():
    assert {"camvid-6-5", "camvid-6-1", "camvid-domains", "camvid-10-1-overlap", "camvid-10-1-disjoint",
            "voc-19-1-overlap", "voc-15-5-disjoint",
            "voc-15-1-overlap", "voc-10-1-disjoint", "ade20k-100-50", "ade20k-100-10",
            "ade20k-50-50"} <= set(PROTOCOLS)
    assert [len(PROTOCOLS[k].steps) for k in ("voc-15-1-overlap", "voc-10-1-overlap", "ade20k-100-10",
                                                 "ade20k-50-50")] == [6, 11, 6, 3]
    with pytest.raises(ValueError, match="built in"):
        get_protocol("voc-1-1")

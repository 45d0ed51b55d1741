"""check_dataset: statistics on a good dataset, every problem found in a broken one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console

from data_testkit import save
from everseg.data import CheckReport, check_dataset, print_report


def _render(report) -> str:
    console = Console(record=True, width=140, color_system=None)
    print_report(report, console)
    return console.export_text()


def test_good_dataset_report(camvid_folder, camvid_crops):
    report = check_dataset(camvid_folder)
    assert isinstance(report, CheckReport) and report.ok and report.dataset == "folder"
    assert list(report.splits) == ["train", "val"]
    train = report.splits["train"]
    assert train.num_samples == train.num_checked == 3
    assert dict(train.image_sizes) == {(40, 30): 3}
    raw = np.stack([m for _, _, m in camvid_crops[:3]])
    expected = np.bincount(raw.ravel(), minlength=12)
    assert train.class_pixels.tolist() == expected[:11].tolist()
    assert train.ignore_pixels == expected[11]
    assert train.total_pixels == 3 * 30 * 40
    assert train.ignore_fraction == pytest.approx(expected[11] / (3 * 1200))
    assert train.cache_bytes == 3 * 30 * 40 * 4
    assert report.cache_bytes == 4 * 30 * 40 * 4
    all_raw = np.stack([m for _, _, m in camvid_crops])
    absent = [n for i, n in enumerate(report.label_space.names) if not (all_raw == i).any()]
    assert report.never_present() == absent and absent  # e.g. Sky is not in these crops
    text = _render(report)
    assert "OK" in text and "Bicyclist" in text and "never present" in text
    json.dumps(report.to_dict())


def test_broken_dataset_collects_every_problem(make_folder, isbi_crops):
    pairs = [(s, img, (m == 255).astype(np.uint8)) for s, img, m in isbi_crops]
    root = make_folder("broken", pairs, "membrane\ncell\n")
    (root / "images" / "0.png").write_bytes(b"garbage bytes, not an image")
    save(root / "masks" / "1.png", np.zeros((10, 10), dtype=np.uint8))
    bad = np.asarray(pairs[2][2]).copy()
    bad[0, 0] = 9
    save(root / "masks" / "2.png", bad)
    report = check_dataset(root)
    assert not report.ok and report.num_problems == 3
    assert {p.path.name for p in report.problems} == {"0.png", "1.png", "2.png"}
    by_name = {p.path.name: p for p in report.problems}
    assert by_name["0.png"].path.parent.name == "images"
    assert by_name["1.png"].path.parent.name == "masks" and "10x10" in by_name["1.png"].message
    assert "[9]" in by_name["2.png"].message
    assert report.splits["all"].num_checked == 1  # the good one still counted
    text = _render(report)
    assert "3 problem(s)" in text and "garbage" not in text and "10x10" in text

    limited = check_dataset(root, max_problems=1)
    assert len(limited.problems) == 1 and limited.num_problems == 3 and limited.truncated


def test_structural_problems_are_all_listed(make_folder, isbi_crops):
    root = make_folder("orphans", isbi_crops, "a\nb\n")
    (root / "masks" / "0.png").unlink()
    (root / "images" / "1.png").unlink()
    (root / "images" / "2.png").write_bytes(b"not an image")
    report = check_dataset(root)
    assert not report.ok and report.num_problems == 3
    assert sorted((p.path.parent.name, p.path.name) for p in report.problems) == [
        ("images", "0.png"), ("images", "2.png"), ("masks", "1.png")]
    # the pairs without a structural problem were still decoded: 2.png is garbage, 10.png fine
    all_ = report.splits["all"]
    assert all_.opened and all_.num_samples == 2 and all_.num_checked == 1


def test_unknown_folder(tmp_path):
    report = check_dataset(tmp_path)
    assert not report.ok and report.problems[0].path == tmp_path
    assert "cannot tell" in _render(report)


def test_subset_and_leak_warning(make_folder, isbi_crops):
    root = make_folder("leak", isbi_crops, "a\nb\n", lists={"train": "0\n1\n2\n", "val": "2\n10\n"})
    report = check_dataset(root, max_samples_per_split=2)
    assert report.ok
    assert report.splits["train"].num_checked == 2
    assert report.splits["train"].cache_bytes_estimate == 3 * 30 * 40 * 4
    assert any("both 'train' and 'val'" in w for w in report.warnings)

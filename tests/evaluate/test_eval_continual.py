"""Continual metrics on hand-made accuracy matrices."""

import json

import pytest

from everseg.evaluate.continual import ContinualReport, StepRecord


def class_report():
    r = ContinualReport("toy", "finetune", "class", classes=["A", "B", "C"], taught_at={"A": 0, "B": 0, "C": 1})
    r.steps.append(StepRecord(0, "base", 10.0, 100, {"A": 80.0, "B": 60.0}, [], ["A", "B"]))
    r.steps.append(StepRecord(1, "C", 2.0, 20, {"A": 70.0, "B": 30.0, "C": 50.0}, ["A", "B"], ["C"]))
    return r


def test_class_incremental_summary_by_hand(tmp_path):
    r = class_report()
    assert [s.all_miou for s in r.steps] == [70.0, 50.0]
    assert (r.steps[1].old_miou, r.steps[1].new_miou) == (50.0, 50.0)
    assert r.steps[0].old_miou is None
    assert r.forgetting() == {"A": 10.0, "B": 30.0, "C": None}
    assert r.backward_transfer() == pytest.approx(-20.0)
    assert r.forward_transfer() is None
    assert r.average_incremental_miou() == pytest.approx(60.0)
    a = r.accuracy_matrix()
    assert a.shape == (2, 3) and a[0, 2] != a[0, 2]  # NaN: C not taught at step 0
    r.save(tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["steps"][1]["old_miou"] == 50.0 and data["accuracy_matrix"][0][2] is None
    assert "| 1 | C | 20 | 50.0 | 50.0 | 50.0 | 2 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "iou_across_steps.png").read_bytes()[:4] == b"\x89PNG"


def test_domain_incremental_bwt_fwt_by_hand():
    r = ContinualReport("dom", "replay", "domain", classes=["A"], taught_at={"A": 0}, domains=["day", "dusk"],
                        learned_at={"day": 0, "dusk": 2}, initial_domain_miou={"day": 10.0, "dusk": 5.0})
    for t, (day, dusk) in enumerate([(60.0, 30.0), (58.0, 35.0), (55.0, 50.0)]):
        r.steps.append(StepRecord(t, f"s{t}", 1.0, 10, {"A": day}, ["A"] if t else [], [] if t else ["A"],
                                  domain_miou={"day": day, "dusk": dusk}))
    assert r.backward_transfer() == pytest.approx(-5.0)
    assert r.forward_transfer() == pytest.approx(30.0)


def test_report_reads_back_what_it_saved(tmp_path):
    r = class_report()
    r.save(tmp_path)
    back = ContinualReport.load(tmp_path)
    assert back.steps == r.steps and back.taught_at == r.taught_at
    assert back.backward_transfer() == r.backward_transfer()
    (tmp_path / "bad.json").write_text('{"steps": 3}')
    with pytest.raises(ValueError, match="bad.json"):
        ContinualReport.load(tmp_path / "bad.json")

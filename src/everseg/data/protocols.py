"""Built-in incremental protocols: the CamVid ones of everseg and the standard VOC / ADE20K ones.

VOC and ADE20K protocols follow the literature (MiB, Cermelli et al. 2020; PLOP, Douillard
et al. 2021): classes in the dataset's own order, "N-M" = N base classes then M more in one
step, "N-1" = then one class per step. Names end in ``-overlap`` or ``-disjoint``.
"""

from __future__ import annotations

from everseg.data.ade20k import ADE20K_CLASSES
from everseg.data.camvid import CAMVID_CLASSES
from everseg.data.scenarios import ScenarioSpec, StepSpec
from everseg.data.voc import VOC_CLASSES

CAMVID_BASE = ("Sky", "Building", "Road", "Pavement", "Tree", "Car")
CAMVID_NEW = ("Pole", "SignSymbol", "Fence", "Pedestrian", "Bicyclist")
# The disjoint setting needs base images without the later classes. 1 CamVid training image
# of 367 lacks all of CAMVID_NEW (poles and signs are everywhere), 166 lack a bicyclist: the
# one CamVid split where both settings have a real base.
CAMVID_LAST = "Bicyclist"


def _class_steps(classes: tuple[str, ...], base: int, increments: list[int], setting: str) -> tuple[StepSpec, ...]:
    steps, start = [StepSpec(classes=classes[:base], setting=setting)], base
    for n in increments:
        steps.append(StepSpec(classes=classes[start:start + n], setting=setting))
        start += n
    if start != len(classes):
        raise ValueError(f"protocol covers {start} of {len(classes)} classes")
    return tuple(steps)


def _protocols() -> dict[str, ScenarioSpec]:
    p: dict[str, ScenarioSpec] = {
        "camvid-6-5": ScenarioSpec("camvid-6-5", "class", (StepSpec(CAMVID_BASE), StepSpec(CAMVID_NEW)),
                                   dataset="camvid"),
        "camvid-6-1": ScenarioSpec("camvid-6-1", "class",
                                   (StepSpec(CAMVID_BASE),) + tuple(StepSpec((c,)) for c in CAMVID_NEW),
                                   dataset="camvid"),
        "camvid-domains": ScenarioSpec(
            "camvid-domains", "domain",
            (StepSpec(images="0016E5", name="0016E5 (day)"), StepSpec(images="0006R0", name="0006R0 (day)"),
             StepSpec(images="0001TP", name="0001TP (dusk)")),
            dataset="camvid", test_domains={"day": "Seq05VD", "dusk": "0001TP"}),
    }
    assert set(CAMVID_BASE + CAMVID_NEW) == set(CAMVID_CLASSES)
    for setting in ("overlap", "disjoint"):
        key = f"camvid-10-1-{setting}"
        p[key] = ScenarioSpec(key, "class", _class_steps(tuple(c for c in CAMVID_CLASSES if c != CAMVID_LAST)
                                                         + (CAMVID_LAST,), 10, [1], setting), dataset="camvid")
    voc = VOC_CLASSES[1:]  # background is the dataset's own class 0, part of every step's labels
    for setting in ("overlap", "disjoint"):
        for name, base, inc in (("19-1", 19, [1]), ("15-5", 15, [5]), ("15-1", 15, [1] * 5),
                                ("10-1", 10, [1] * 10)):
            key = f"voc-{name}-{setting}"
            p[key] = ScenarioSpec(key, "class", _class_steps(voc, base, inc, setting), dataset="voc",
                                  train_split="train_aug", test_split="val")
    for name, base, inc in (("100-50", 100, [50]), ("100-10", 100, [10] * 5), ("50-50", 50, [50, 50])):
        key = f"ade20k-{name}"
        p[key] = ScenarioSpec(key, "class", _class_steps(ADE20K_CLASSES, base, inc, "overlap"),
                              dataset="ade20k", train_split="train", test_split="val")
    return p


PROTOCOLS: dict[str, ScenarioSpec] = _protocols()


def get_protocol(name: str) -> ScenarioSpec:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; built in: {sorted(PROTOCOLS)}") from None

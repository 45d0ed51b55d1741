"""Scenarios: the steps of an incremental-learning run, and the data each step may use.

A scenario is a list of steps. Each step names the classes it teaches (the first
step's are the base classes) and which images it may use. Three kinds:

- **class-incremental**: classes arrive over steps. In the *overlap* setting (the
  literature's default) a step's images are every training image holding one of its
  new classes; in the *disjoint* setting images that hold a class of a *later* step
  are left out. Only the step's new classes are labelled: every other labelled pixel
  becomes **background** (class 0) - the background shift of MiB/PLOP. Test masks
  label every class learned so far; classes not learned yet are background.
- **domain-incremental**: the same classes, new conditions; each step is another
  image source (a ``Sample.group`` such as a video sequence, or a split list).
- **stream**: one step's images arrive one at a time, in order (for the online learner).

Background where the dataset has none (CamVid): the model gets an extra class 0,
``background``, that means "none of the classes learned so far". It is learned like
VOC's background, but it is not a class of the dataset, so it is left out of the
old/new/all mIoU (:attr:`Step.scored_ids`). Unlabelled pixels (255) stay ignored in
every step: ignore never becomes background.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import yaml

from everseg.data.dataset import SegmentationDataset
from everseg.data.errors import DataError
from everseg.data.labelspace import LabelSpace, default_palette

BACKGROUND = "background"
Setting = Literal["overlap", "disjoint"]
Kind = Literal["class", "domain", "stream"]


@dataclass(frozen=True)
class StepSpec:
    """What one step teaches and where its images come from (before any data is read)."""

    classes: tuple[str, ...] = ()  # class names taught here; domain/stream steps: () = all classes
    images: str | tuple[str, ...] | None = None  # a split name, a list file, a group, or stems
    setting: Setting = "overlap"  # class-incremental image selection
    name: str = ""


@dataclass(frozen=True)
class ScenarioSpec:
    """A named sequence of steps, as written in YAML or given by a built-in protocol."""

    name: str
    kind: Kind
    steps: tuple[StepSpec, ...]
    dataset: str | None = None  # the dataset kind the scenario is written for (None = any)
    train_split: str = "train"  # pool of training images
    test_split: str = "test"  # images every step is tested on
    test_domains: dict[str, str] = field(default_factory=dict)  # domain name -> test group

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError(f"scenario {self.name!r} has no steps")
        if self.kind == "class":
            seen: set[str] = set()
            for i, step in enumerate(self.steps):
                if not step.classes:
                    raise ValueError(f"scenario {self.name!r}: step {i} teaches no classes")
                again = seen.intersection(step.classes)
                if again:
                    raise ValueError(f"scenario {self.name!r}: step {i} teaches {sorted(again)} again")
                seen.update(step.classes)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ScenarioSpec":
        """Read a user scenario: ``steps: [{classes: [...], images: ..., setting: ...}, ...]``."""
        path = Path(path)
        try:
            tree = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise DataError(path, f"cannot read scenario: {' '.join(str(exc).split())}") from exc
        if not isinstance(tree, dict) or not isinstance(tree.get("steps"), list):
            raise DataError(path, "a scenario file needs a list 'steps'")
        known = {"name", "kind", "steps", "dataset", "train_split", "test_split", "test_domains"}
        unknown = set(tree) - known
        if unknown:
            raise DataError(path, f"unknown scenario keys {sorted(unknown)}; known: {sorted(known)}")
        steps = []
        for i, raw in enumerate(tree["steps"]):
            if not isinstance(raw, dict):
                raise DataError(path, f"step {i} must be a mapping with 'classes'")
            extra = set(raw) - {"classes", "images", "setting", "name"}
            if extra:
                raise DataError(path, f"step {i}: unknown keys {sorted(extra)}")
            setting = raw.get("setting", "overlap")
            if setting not in ("overlap", "disjoint"):
                raise DataError(path, f"step {i}: setting must be overlap or disjoint, not {setting!r}")
            images = raw.get("images")
            steps.append(StepSpec(classes=tuple(str(c) for c in raw.get("classes") or ()),
                                  images=tuple(images) if isinstance(images, list) else images,
                                  setting=setting, name=str(raw.get("name", ""))))
        try:
            return cls(name=str(tree.get("name", path.stem)), kind=tree.get("kind", "class"),
                       steps=tuple(steps), dataset=tree.get("dataset"),
                       train_split=tree.get("train_split", "train"),
                       test_split=tree.get("test_split", "test"),
                       test_domains=dict(tree.get("test_domains") or {}))
        except ValueError as exc:
            raise DataError(path, str(exc)) from exc


@dataclass
class Step:
    """One step, ready to train: relabelled data views and the model's label space after it."""

    index: int
    name: str
    new_classes: tuple[str, ...]  # names taught at this step (empty for domain steps)
    label_space: LabelSpace  # the model's classes after this step
    train: SegmentationDataset  # this step's training images, background shift applied
    tests: dict[str, SegmentationDataset]  # test views: "all", or one per domain
    old_ids: tuple[int, ...]  # model ids learned before this step (scored ones only)
    new_ids: tuple[int, ...]  # model ids learned at this step (scored ones only)
    joint_train: SegmentationDataset | None = None  # every image of steps <= this, all learned classes labelled

    @property
    def scored_ids(self) -> tuple[int, ...]:
        """Model class ids that count in old/new/all mIoU (the synthetic background does not)."""
        return self.old_ids + self.new_ids


@dataclass
class Scenario:
    spec: ScenarioSpec
    steps: list[Step]
    final_label_space: LabelSpace
    synthetic_background: bool  # True when "background" was added because the dataset has none

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def has_background(ls: LabelSpace) -> bool:
    return ls.names[0].lower() in (BACKGROUND, "_background_")


def _select(pool: SegmentationDataset, images: str | tuple[str, ...] | None,
            base_dir: Path | None) -> list[int]:
    """Indices of ``pool`` that a step's ``images`` selects (group, list file or stems)."""
    if images is None:
        return list(range(len(pool)))
    if isinstance(images, str):
        groups = {s.group for s in pool.samples}
        if images in groups:
            return [i for i, s in enumerate(pool.samples) if s.group == images]
        path = Path(images)
        if base_dir is not None and not path.is_absolute() and (base_dir / path).is_file():
            path = base_dir / path
        if path.is_file():
            stems = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        else:
            raise DataError(path, f"'images: {images}' is neither a group of this dataset "
                                  f"({sorted(g for g in groups if g)}) nor a list file")
    else:
        stems = list(images)
    index = {s.stem: i for i, s in enumerate(pool.samples)}
    missing = [s for s in stems if Path(s).stem not in index]
    if missing:
        raise DataError(None, f"step lists images not in the training pool: {missing[:5]}")
    return [index[Path(s).stem] for s in stems]


def build_scenario(spec: ScenarioSpec, train_pool: SegmentationDataset, test_set: SegmentationDataset,
                   *, base_dir: str | Path | None = None, base_trained: bool = False) -> Scenario:
    """Resolve ``spec`` on real data: which images each step uses and how its masks are labelled.

    ``base_trained``: step 0 was learned elsewhere (an existing model), so this data need
    not hold (or even name) its classes, and step 0 gets no training images.
    """
    base = Path(base_dir) if base_dir is not None else None
    if spec.kind == "class":
        return _class_incremental(spec, train_pool, test_set, base, base_trained)
    return _domain_incremental(spec, train_pool, test_set, base)


def _class_incremental(spec: ScenarioSpec, pool: SegmentationDataset, test_set: SegmentationDataset,
                       base_dir: Path | None, base_trained: bool = False) -> Scenario:
    data_ls = pool.label_space
    names = data_ls.names
    later = spec.steps[1:] if base_trained else spec.steps
    unknown = [c for st in later for c in st.classes if c not in names]
    if unknown:
        raise DataError(None, f"scenario {spec.name!r} names classes {unknown} that the dataset lacks "
                              f"(classes: {list(names)})")
    has_bg = has_background(data_ls)
    synthetic = not has_bg
    bg_data_id = 0 if has_bg else None
    order = [c for st in spec.steps for c in st.classes if c != names[0] or not has_bg]
    model_names = (BACKGROUND,) + tuple(order)
    fallback = default_palette(len(model_names))
    palette = ((0, 0, 0),) + tuple(data_ls.palette[data_ls.index(c)] if c in names else fallback[k + 1]
                                   for k, c in enumerate(order))
    taught = [0] + [i for i, st in enumerate(spec.steps) for c in st.classes if c != names[0] or not has_bg]
    final_ls = LabelSpace(names=model_names, ignore_index=data_ls.ignore_index, palette=palette,
                          taught_at=tuple(taught))
    model_id = {c: model_names.index(c) for c in order}

    presence = pool.class_pixel_counts(per_image=True) > 0  # images x dataset classes
    steps: list[Step] = []
    learned: list[str] = []
    seen_images: list[int] = []
    for t, st in enumerate(spec.steps):
        new = [c for c in st.classes if c != names[0] or not has_bg]
        in_data = [c for c in new if c in names]  # all of them, except a base learned elsewhere
        candidates = _select(pool, st.images, base_dir)
        new_cols = [data_ls.index(c) for c in in_data]
        future_cols = [data_ls.index(c) for later in spec.steps[t + 1:] for c in later.classes]
        keep = [i for i in candidates if new_cols and presence[i, new_cols].any()
                and not (st.setting == "disjoint" and future_cols and presence[i, future_cols].any())]
        if not keep and not (base_trained and t == 0):
            raise DataError(None, f"scenario {spec.name!r} step {t}: no training image holds {new}")
        # Train: only this step's classes are labelled; everything else labelled is background.
        lut = np.full(256, 0, dtype=np.uint8)
        lut[data_ls.ignore_index] = data_ls.ignore_index
        for c in in_data:
            lut[data_ls.index(c)] = model_id[c]
        learned_after = learned + new
        n_known = 1 + len(learned_after)
        step_ls = LabelSpace(names=final_ls.names[:n_known], ignore_index=final_ls.ignore_index,
                             palette=final_ls.palette[:n_known], taught_at=final_ls.taught_at[:n_known])
        train = pool.subset(keep).relabel(lut, step_ls, name=f"{spec.name}/step{t}/train")
        # Test: everything learned so far is labelled; classes still to come are background.
        test_lut = np.full(256, 0, dtype=np.uint8)
        test_lut[data_ls.ignore_index] = data_ls.ignore_index
        for c in learned_after:
            if c in names:
                test_lut[data_ls.index(c)] = model_id[c]
        test = test_set.relabel(test_lut, step_ls, name=f"{spec.name}/step{t}/test")
        seen_images = sorted(set(seen_images) | set(keep))
        joint = pool.subset(seen_images).relabel(test_lut, step_ls, name=f"{spec.name}/step{t}/joint")
        old_ids = tuple(model_id[c] for c in learned)
        new_ids = tuple(model_id[c] for c in new)
        if has_bg and t == 0:
            new_ids = (0,) + new_ids  # VOC-style: background is a real class, taught at step 0
        steps.append(Step(index=t, name=st.name or f"step {t}", new_classes=tuple(new),
                          label_space=step_ls, train=train, tests={"all": test},
                          old_ids=old_ids if not (has_bg and t > 0) else (0,) + old_ids,
                          new_ids=new_ids, joint_train=joint))
        learned = learned_after
    return Scenario(spec=spec, steps=steps, final_label_space=final_ls, synthetic_background=synthetic)


def _domain_incremental(spec: ScenarioSpec, pool: SegmentationDataset, test_set: SegmentationDataset,
                        base_dir: Path | None) -> Scenario:
    ls = pool.label_space
    if spec.test_domains:
        tests = {}
        for domain, group in spec.test_domains.items():
            idx = [i for i, s in enumerate(test_set.samples) if s.group == group]
            if not idx:
                raise DataError(None, f"scenario {spec.name!r}: no test image of group {group!r}")
            tests[domain] = test_set.subset(idx, name=f"{spec.name}/test/{domain}")
    else:
        tests = {"all": test_set}
    ids = tuple(range(ls.num_classes))
    steps = []
    seen_images: list[int] = []
    for t, st in enumerate(spec.steps):
        idx = _select(pool, st.images, base_dir)
        if not idx:
            raise DataError(None, f"scenario {spec.name!r} step {t}: no training images")
        seen_images = sorted(set(seen_images) | set(idx))
        steps.append(Step(index=t, name=st.name or (st.images if isinstance(st.images, str) else f"step {t}"),
                          new_classes=(), label_space=ls,
                          train=pool.subset(idx, name=f"{spec.name}/step{t}/train"), tests=tests,
                          old_ids=ids if t else (), new_ids=() if t else ids,
                          joint_train=pool.subset(seen_images, name=f"{spec.name}/step{t}/joint")))
    return Scenario(spec=spec, steps=steps, final_label_space=ls, synthetic_background=False)


def stream_order(step: Step) -> list[int]:
    """The order a stream step's images arrive in: by file name (video frames in time order)."""
    return sorted(range(len(step.train)), key=lambda i: step.train.samples[i].stem)


def describe(scenario: Scenario) -> list[dict[str, Any]]:
    """One row per step: images, new classes, old/new ids (for reports and the CLI)."""
    return [{"step": s.index, "name": s.name, "images": len(s.train), "new_classes": list(s.new_classes),
             "old_ids": list(s.old_ids), "new_ids": list(s.new_ids)} for s in scenario.steps]


def align_labels(dataset: SegmentationDataset, label_space: LabelSpace) -> SegmentationDataset:
    """A view of ``dataset`` whose class ids are those of ``label_space`` (matched by name).

    Dataset classes the label space lacks become background when it has one, and are an
    error otherwise; ignore stays ignore.
    """
    if dataset.label_space.names == label_space.names:
        return dataset
    has_bg = has_background(label_space)
    lut = np.full(256, 0, dtype=np.uint8)
    lut[dataset.label_space.ignore_index] = label_space.ignore_index
    missing = []
    for i, name in enumerate(dataset.label_space.names):
        if name in label_space.names:
            lut[i] = label_space.index(name)
        elif has_bg:
            lut[i] = 0
        else:
            missing.append(name)
    if missing:
        raise DataError(None, f"dataset {dataset.name!r} has classes {missing} that the model does not know")
    return dataset.relabel(lut, label_space)


def align_to_model(dataset: SegmentationDataset, label_space: LabelSpace
                   ) -> tuple[SegmentationDataset, list[int] | None]:
    """``dataset`` in the class ids of ``label_space`` (a model's), and the ids to score
    (None = all).

    A model taught new classes has a ``background`` class and the new ones besides the data's
    classes, in its own order: the data is relabelled by class name, and only the classes the
    data names are scored (the model's extra classes have no truth here, so their IoU would
    only count the model's mistakes twice).
    """
    model_names, data_names = tuple(label_space.names), tuple(dataset.label_space.names)
    if model_names[:len(data_names)] == data_names:
        return dataset, None if len(model_names) == len(data_names) else list(range(len(data_names)))
    unknown = [n for n in data_names if n not in model_names]
    if unknown:
        raise DataError(None, f"the dataset {dataset.name!r} has classes the model does not know: {unknown} "
                              f"(model classes: {list(model_names)})")
    return align_labels(dataset, label_space), sorted(model_names.index(n) for n in data_names)

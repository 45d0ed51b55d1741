"""Metrics of a continual run: the accuracy matrix, old/new/all mIoU, forgetting, BWT, FWT.

Every number is an IoU in percent (0-100). After step ``t`` the model is tested on
the classes learned so far; ``old`` are the classes learned before ``t``, ``new``
those learned at ``t``, ``all`` both. Definitions:

- accuracy matrix ``A[t, c]``: IoU of class ``c`` after step ``t`` (NaN before ``c`` is taught);
- per-class forgetting (Chaudhry et al., ECCV 2018): ``max_{t' < T} A[t', c] - A[T, c]``
  over the steps since ``c`` was taught, ``T`` the last step;
- backward transfer (Lopez-Paz & Ranzato, NeurIPS 2017): mean over the groups ``k`` taught
  before the last step of ``G[T, k] - G[k, k]``, ``G[t, k]`` = mIoU of group ``k``'s
  classes after step ``t`` (negative = forgetting). In a domain-incremental run the
  groups are the test domains, and ``G[k, k]`` is the score right after the step that
  trained on that domain (``learned_at``);
- forward transfer (same paper): mean over groups learned after step 0 of
  ``G[k-1, k] - b_k``, ``b_k`` the score of the model before the run. A class-incremental
  model cannot predict a class before it is taught, so there FWT is not defined (None);
- average incremental mIoU: the mean over steps of the all-classes mIoU.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from everseg.atomic import atomic_write, atomic_write_json, atomic_write_text


def _nanmean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


@dataclass
class StepRecord:
    """What one step cost and what the model scored after it."""

    step: int
    name: str
    seconds: float  # wall time of the step's training
    images_seen: int  # training images processed (epochs x images, replay included)
    class_iou: dict[str, float | None]  # IoU after this step of every class learned so far
    old_classes: list[str]
    new_classes: list[str]
    domain_miou: dict[str, float | None] = field(default_factory=dict)  # domain-incremental runs

    @property
    def old_miou(self) -> float | None:
        return _nanmean([self.class_iou.get(c) for c in self.old_classes])

    @property
    def new_miou(self) -> float | None:
        return _nanmean([self.class_iou.get(c) for c in self.new_classes])

    @property
    def all_miou(self) -> float | None:
        return _nanmean([self.class_iou.get(c) for c in self.old_classes + self.new_classes])


@dataclass
class ContinualReport:
    scenario: str
    strategy: str
    kind: str  # "class" or "domain"
    classes: list[str]  # scored classes, in the order they were taught
    taught_at: dict[str, int]  # class -> step that taught it
    steps: list[StepRecord] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)  # domain runs: test domain names
    learned_at: dict[str, int] = field(default_factory=dict)  # domain -> step that trained on it
    initial_domain_miou: dict[str, float | None] = field(default_factory=dict)  # before step 0 (for FWT)

    # ---------------------------------------------------------------- matrices
    def accuracy_matrix(self) -> np.ndarray:
        """``A[t, c]``: IoU (percent) of class ``classes[c]`` after step ``t``; NaN if not taught yet."""
        a = np.full((len(self.steps), len(self.classes)), np.nan)
        for t, rec in enumerate(self.steps):
            for j, c in enumerate(self.classes):
                v = rec.class_iou.get(c)
                if v is not None and self.taught_at[c] <= t:
                    a[t, j] = v
        return a

    def group_matrix(self) -> tuple[list[str], np.ndarray]:
        """``G[t, k]``: mIoU of group ``k`` after step ``t`` (class groups by step, or test domains)."""
        if self.kind == "domain":
            g = np.array([[np.nan if r.domain_miou.get(d) is None else r.domain_miou[d] for d in self.domains]
                          for r in self.steps])
            return list(self.domains), g
        a = self.accuracy_matrix()
        n_groups = len(self.steps)
        g = np.full((len(self.steps), n_groups), np.nan)
        for k in range(n_groups):
            cols = [j for j, c in enumerate(self.classes) if self.taught_at[c] == k]
            if cols:
                with warnings.catch_warnings():  # all-NaN rows (before the group is taught) stay NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    g[:, k] = np.nanmean(a[:, cols], axis=1) if len(cols) > 1 else a[:, cols[0]]
        return [f"step {k}" for k in range(n_groups)], g

    # ---------------------------------------------------------------- summaries
    def forgetting(self) -> dict[str, float | None]:
        """Per class: best IoU before the last step (since it was taught) minus the final IoU."""
        a = self.accuracy_matrix()
        out: dict[str, float | None] = {}
        last = len(self.steps) - 1
        for j, c in enumerate(self.classes):
            earlier = a[self.taught_at[c]:last, j]
            earlier = earlier[~np.isnan(earlier)]
            out[c] = None if last < 1 or not earlier.size or np.isnan(a[last, j]) else float(earlier.max() - a[last, j])
        return out

    def backward_transfer(self) -> float | None:
        names, g = self.group_matrix()
        last = len(self.steps) - 1
        diffs = []
        for k, name in enumerate(names):
            at = self.learned_at.get(name, 0) if self.kind == "domain" else k
            if at < last and not np.isnan(g[last, k]) and not np.isnan(g[at, k]):
                diffs.append(g[last, k] - g[at, k])
        return float(np.mean(diffs)) if diffs else None

    def forward_transfer(self) -> float | None:
        if self.kind != "domain":
            return None
        names, g = self.group_matrix()
        diffs = []
        for k, name in enumerate(names):
            at = self.learned_at.get(name, 0)
            base = self.initial_domain_miou.get(name)
            if at >= 1 and base is not None and not np.isnan(g[at - 1, k]):
                diffs.append(g[at - 1, k] - base)
        return float(np.mean(diffs)) if diffs else None

    def average_incremental_miou(self) -> float | None:
        return _nanmean([r.all_miou for r in self.steps])

    def total_seconds(self) -> float:
        return float(sum(r.seconds for r in self.steps))

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            if isinstance(x, float) and math.isnan(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        steps = []
        for r in self.steps:
            d = asdict(r)
            d.update(old_miou=r.old_miou, new_miou=r.new_miou, all_miou=r.all_miou)
            steps.append(d)
        group_names, g = self.group_matrix()
        return clean({
            "scenario": self.scenario, "strategy": self.strategy, "kind": self.kind,
            "classes": self.classes, "taught_at": self.taught_at, "steps": steps,
            "accuracy_matrix": self.accuracy_matrix().tolist(),
            "group_names": group_names, "group_matrix": g.tolist(),
            "forgetting": self.forgetting(), "backward_transfer": self.backward_transfer(),
            "forward_transfer": self.forward_transfer(),
            "average_incremental_miou": self.average_incremental_miou(),
            "total_seconds": self.total_seconds(),
            "domains": self.domains, "learned_at": self.learned_at, "initial_domain_miou": self.initial_domain_miou,
        })

    def to_markdown(self, reference: "ContinualReport | None" = None) -> str:
        """Per-step table; with ``reference`` (e.g. the joint run) its time per step beside ours."""
        fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
        head = "| step | new classes | images | old mIoU | new mIoU | all mIoU | seconds |"
        sep = "|---|---|---:|---:|---:|---:|---:|"
        if reference is not None:
            head += " joint seconds |"
            sep += "---:|"
        rows = [head, sep]
        for r in self.steps:
            row = (f"| {r.step} | {', '.join(r.new_classes) or r.name} | {r.images_seen} | {fmt(r.old_miou)} | "
                   f"{fmt(r.new_miou)} | {fmt(r.all_miou)} | {r.seconds:.0f} |")
            if reference is not None:
                ref = reference.steps[r.step].seconds if r.step < len(reference.steps) else None
                row += f" {'–' if ref is None else f'{ref:.0f}'} |"
            rows.append(row)
        bwt, fwt = self.backward_transfer(), self.forward_transfer()
        rows.append("")
        rows.append(f"Average incremental mIoU {fmt(self.average_incremental_miou())}, "
                    f"BWT {fmt(bwt)}, FWT {fmt(fwt)}.")
        return "\n".join(rows) + "\n"

    def print_table(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console(emoji=False)
        table = Table(title=f"{self.scenario} / {self.strategy}")
        for col in ("step", "new classes", "images", "old mIoU", "new mIoU", "all mIoU", "seconds"):
            table.add_column(col, justify="left" if col == "new classes" else "right")
        fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
        for r in self.steps:
            table.add_row(str(r.step), ", ".join(r.new_classes) or r.name, str(r.images_seen), fmt(r.old_miou),
                          fmt(r.new_miou), fmt(r.all_miou), f"{r.seconds:.0f}")
        console.print(table)
        console.print(f"average incremental mIoU {fmt(self.average_incremental_miou())}  "
                      f"BWT {fmt(self.backward_transfer())}  FWT {fmt(self.forward_transfer())}")

    def plot(self, path: str | Path) -> Path:
        """PNG: IoU of every class (or test domain) across steps."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4.5), dpi=100)
        ax = fig.add_subplot()
        steps = np.arange(len(self.steps))
        if self.kind == "domain":
            names, g = self.group_matrix()
            series = [(n, g[:, k]) for k, n in enumerate(names)]
        else:
            a = self.accuracy_matrix()
            series = [(c, a[:, j]) for j, c in enumerate(self.classes)]
        for name, ys in series:
            ax.plot(steps, ys, marker="o", label=name)
        ax.plot(steps, [np.nan if r.all_miou is None else r.all_miou for r in self.steps], "k--", lw=2,
                label="all mIoU")
        ax.set_xticks(steps, [r.name for r in self.steps], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("IoU (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{self.scenario} / {self.strategy}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        return atomic_write(path, lambda p: fig.savefig(p, format="png"))

    @classmethod
    def load(cls, path: str | Path) -> "ContinualReport":
        """Read back a ``results.json`` written by :meth:`save` (a file or its run folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "results.json"
        try:
            d = json.loads(path.read_text())
            record_fields = {f.name for f in fields(StepRecord)}
            steps = [StepRecord(**{k: v for k, v in r.items() if k in record_fields}) for r in d["steps"]]
            return cls(scenario=d["scenario"], strategy=d["strategy"], kind=d["kind"], classes=d["classes"],
                       taught_at=d["taught_at"], steps=steps, domains=d.get("domains", []),
                       learned_at=d.get("learned_at", {}), initial_domain_miou=d.get("initial_domain_miou", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a continual results file ({exc})") from exc

    def save(self, out_dir: str | Path, reference: "ContinualReport | None" = None) -> None:
        out = Path(out_dir)
        atomic_write_json(out / "results.json", self.to_dict())
        atomic_write_text(out / "results.md", self.to_markdown(reference))
        self.plot(out / "iou_across_steps.png")

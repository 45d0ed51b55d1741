"""Check a dataset before training on it: decode every sample and report what is there.

``check_dataset`` opens every labelled split it finds, decodes every image and mask
(without caching), and keeps going after a problem: each problem is recorded with
the file it concerns (up to ``max_problems``; the total is always counted). The
report gives, per split, the image count, the image sizes seen, the class pixel
frequencies, the ignore fraction, the classes never present and the memory the
decoded in-memory cache would take. ``report.ok`` is False when anything was wrong.

``print_report`` renders it with rich tables; ``CheckReport.to_dict`` gives plain
JSON-able data.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from everseg.data.dataset import SegmentationDataset
from everseg.data.errors import DataError
from everseg.data.labelspace import LabelSpace
from everseg.data.open import available_splits, dataset_kind, open_dataset

DEFAULT_MAX_PROBLEMS = 100


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data: which split, which file, what."""

    split: str
    path: Path | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return f"[{self.split}] {where}{self.message}" if self.split else f"{where}{self.message}"


@dataclass
class SplitStats:
    """What one split holds, over the samples that decoded cleanly."""

    name: str
    num_samples: int = 0  # samples the reader listed
    num_checked: int = 0  # samples decoded without a problem
    image_sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ignore_pixels: int = 0
    total_pixels: int = 0
    cache_bytes: int = 0  # decoded uint8 images (H x W x 3) + masks (H x W)
    empty_masks: int = 0  # masks with no labelled pixel
    opened: bool = True  # False when the split could not be read at all

    @property
    def cache_bytes_estimate(self) -> int:
        """Decoded-cache bytes for the whole split (extrapolated when only some were checked)."""
        if not self.num_checked:
            return 0
        return round(self.cache_bytes * max(self.num_samples, self.num_checked) / self.num_checked)

    @property
    def ignore_fraction(self) -> float:
        return self.ignore_pixels / self.total_pixels if self.total_pixels else 0.0

    def class_fractions(self) -> np.ndarray:
        """Pixels per class as a fraction of all pixels (ignore included in the total)."""
        return self.class_pixels / self.total_pixels if self.total_pixels else np.zeros_like(
            self.class_pixels, dtype=np.float64)


@dataclass
class CheckReport:
    """The result of :func:`check_dataset`."""

    root: Path
    dataset: str | None
    label_space: LabelSpace | None
    splits: dict[str, SplitStats]
    problems: list[Problem]
    num_problems: int  # every problem found; ``problems`` keeps the first ``max_problems``
    warnings: list[str]
    max_problems: int = DEFAULT_MAX_PROBLEMS

    @property
    def ok(self) -> bool:
        return self.num_problems == 0

    @property
    def truncated(self) -> bool:
        return self.num_problems > len(self.problems)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.splits.values())

    @property
    def class_pixels(self) -> np.ndarray:
        n = self.label_space.num_classes if self.label_space else 0
        total = np.zeros(n, dtype=np.int64)
        for s in self.splits.values():
            if len(s.class_pixels) == n:
                total += s.class_pixels
        return total

    @property
    def total_pixels(self) -> int:
        return sum(s.total_pixels for s in self.splits.values())

    @property
    def ignore_pixels(self) -> int:
        return sum(s.ignore_pixels for s in self.splits.values())

    @property
    def cache_bytes(self) -> int:
        """What caching every sample of every checked split in memory would take."""
        return sum(s.cache_bytes_estimate for s in self.splits.values())

    def never_present(self, split: str | None = None) -> list[str]:
        """Class names with no pixel in ``split`` (or in any checked split)."""
        if self.label_space is None:
            return []
        counts = self.class_pixels if split is None else self.splits[split].class_pixels
        if len(counts) != self.label_space.num_classes:
            return list(self.label_space.names)
        return [n for n, c in zip(self.label_space.names, counts) if c == 0]

    def to_dict(self) -> dict[str, Any]:
        names = list(self.label_space.names) if self.label_space else []
        return {
            "root": str(self.root),
            "dataset": self.dataset,
            "ok": self.ok,
            "classes": names,
            "splits": {
                k: {
                    "samples": s.num_samples,
                    "checked": s.num_checked,
                    "image_sizes": {f"{w}x{h}": c for (w, h), c in s.image_sizes.most_common()},
                    "class_pixels": dict(zip(names, s.class_pixels.tolist())),
                    "ignore_pixels": s.ignore_pixels,
                    "total_pixels": s.total_pixels,
                    "ignore_fraction": s.ignore_fraction,
                    "never_present": self.never_present(k),
                    "cache_bytes": s.cache_bytes_estimate,
                    "empty_masks": s.empty_masks,
                }
                for k, s in self.splits.items()
            },
            "never_present": self.never_present(),
            "cache_bytes": self.cache_bytes,
            "num_problems": self.num_problems,
            "problems": [{"split": p.split, "path": None if p.path is None else str(p.path),
                          "message": p.message} for p in self.problems],
            "warnings": list(self.warnings),
        }


class _Collector:
    def __init__(self, limit: int):
        self.limit, self.count, self.items = limit, 0, []

    def add(self, split: str, exc: BaseException, fallback: Path | None = None) -> None:
        errors = getattr(exc, "errors", None) or [exc]
        for e in errors:
            self.count += 1
            if len(self.items) >= self.limit:
                continue
            if isinstance(e, DataError):
                self.items.append(Problem(split, e.path, e.problem))
            else:
                self.items.append(Problem(split, fallback, f"{type(e).__name__}: {e}"))


def _decode(ds: SegmentationDataset, i: int) -> tuple[np.ndarray, np.ndarray] | BaseException:
    try:
        return ds.load(i)
    except Exception as exc:  # noqa: BLE001 - every failure is a problem to report, not a crash
        return exc


def _check_split(ds: SegmentationDataset, stats: SplitStats, problems: _Collector, split: str,
                 indices: Sequence[int], workers: int,
                 on_progress: Callable[[str, int, int], None] | None) -> None:
    n = ds.label_space.num_classes
    ignore = ds.label_space.ignore_index
    stats.class_pixels = np.zeros(n, dtype=np.int64)
    with ThreadPoolExecutor(workers) as pool:  # decoding releases the GIL
        for done, (i, result) in enumerate(zip(indices, pool.map(lambda j: _decode(ds, j), indices)), 1):
            if on_progress is not None:
                on_progress(split, done, len(indices))
            sample = ds.samples[i]
            if isinstance(result, BaseException):
                problems.add(split, result, fallback=sample.image)
                continue
            image, mask = result
            counts = np.bincount(mask.ravel(), minlength=256)
            stats.num_checked += 1
            stats.image_sizes[(image.shape[1], image.shape[0])] += 1
            stats.class_pixels += counts[:n]
            stats.ignore_pixels += int(counts[ignore])
            stats.total_pixels += mask.size
            stats.cache_bytes += image.nbytes + mask.nbytes
            if counts[:n].sum() == 0:
                stats.empty_masks += 1
            # Values between num_classes and 255 cannot come out of a MaskMapping, but a
            # custom mapping could produce them: count them as a problem, not a class.
            stray = int(counts[n:].sum() - counts[ignore])
            if stray:
                problems.add(split, DataError(sample.mask, f"{stray} pixels have class ids >= {n} "
                                                           "after mapping"))


def check_dataset(root: str | Path, *, dataset: str | None = None,
                  splits: Sequence[str] | None = None, max_problems: int = DEFAULT_MAX_PROBLEMS,
                  max_samples_per_split: int | None = None, workers: int | None = None,
                  on_progress: Callable[[str, int, int], None] | None = None,
                  **reader_kwargs: Any) -> CheckReport:
    """Decode every sample of every labelled split at ``root`` and report on the data.

    ``splits`` defaults to every split present (see :func:`~everseg.data.open.available_splits`).
    ``max_samples_per_split`` checks an evenly spread subset instead (quick look at
    large datasets). ``on_progress(split, done, total)`` is called after each sample.
    ``reader_kwargs`` go to the reader (e.g. ``mask_format`` for the folder format).
    """
    root = Path(root)
    problems = _Collector(max_problems)
    report = CheckReport(root, None, None, {}, [], 0, [], max_problems)
    try:
        kind = dataset_kind(root, dataset)
    except DataError as exc:
        problems.add("", exc)
        report.problems, report.num_problems = problems.items, problems.count
        return report
    report.dataset = kind
    split_names = list(splits) if splits is not None else available_splits(root, kind)
    if not split_names:
        problems.add("", DataError(root, f"no labelled splits found for dataset kind {kind!r}"))
    workers = workers or min(4, os.cpu_count() or 1)
    members: dict[str, set[Path]] = {}
    for split in split_names:
        stats = SplitStats(split)
        report.splits[split] = stats
        try:
            ds = open_dataset(root, dataset=kind, split=split, cache="none", **reader_kwargs)
        except ValueError as exc:  # DataError, or a split name this kind does not have
            problems.add(split, exc)
            ds = getattr(exc, "partial", None)  # the samples without problems, if any
            if ds is None:
                stats.opened = False
                continue
        if report.label_space is None:
            report.label_space = ds.label_space
        stats.num_samples = len(ds)
        members[split] = {s.image.resolve() for s in ds.samples}
        indices = list(range(len(ds)))
        if max_samples_per_split is not None and len(ds) > max_samples_per_split:
            indices = sorted(set(np.linspace(0, len(ds) - 1, max_samples_per_split).round().astype(int)))
            report.warnings.append(f"{split}: checked {len(indices)} of {len(ds)} samples")
        _check_split(ds, stats, problems, split, indices, workers, on_progress)
        if stats.empty_masks:
            report.warnings.append(f"{split}: {stats.empty_masks} masks have no labelled pixel")
    held_out = ("val", "test")
    names = list(members)
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            if a in held_out or b in held_out:
                common = members[a] & members[b]
                if common:
                    report.warnings.append(f"{len(common)} images are in both '{a}' and '{b}' "
                                           f"(e.g. {sorted(common)[0].name}): held-out data leaks")
    report.problems, report.num_problems = problems.items, problems.count
    return report


# -- rendering ------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def _sizes(counter: Counter, top: int = 3) -> str:
    if not counter:
        return "-"
    parts = [f"{w}x{h} ({c})" for (w, h), c in counter.most_common(top)]
    if len(counter) > top:
        parts.append(f"+{len(counter) - top} more sizes")
    return ", ".join(parts)


def print_report(report: CheckReport, console: Any = None, *, max_rows: int = 30) -> None:
    """Render ``report`` as rich tables (splits, class frequencies, problems, warnings)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(emoji=False)
    status = "[green]OK[/green]" if report.ok else f"[red]{report.num_problems} problem(s)[/red]"
    console.print(f"[bold]{report.root}[/bold]  dataset: {report.dataset or '?'}  {status}")

    if report.splits:
        t = Table(title="Splits")
        for col in ("split", "images", "checked", "image sizes (WxH)", "ignore %", "cache memory"):
            t.add_column(col, justify="right" if col in ("images", "checked", "ignore %") else "left")
        for s in report.splits.values():
            t.add_row(s.name, str(s.num_samples) if s.opened else "[red]unreadable[/red]",
                      str(s.num_checked), _sizes(s.image_sizes), f"{100 * s.ignore_fraction:.2f}",
                      format_bytes(s.cache_bytes_estimate))
        console.print(t)

    ls = report.label_space
    if ls is not None and report.total_pixels:
        split_names = [k for k, s in report.splits.items() if s.total_pixels]
        t = Table(title="Class pixels (% of all pixels, ignore included)")
        t.add_column("id", justify="right")
        t.add_column("class")
        t.add_column("pixels", justify="right")
        t.add_column("%", justify="right")
        for k in split_names:
            t.add_column(f"{k} %", justify="right")
        total = report.total_pixels
        fractions = {k: report.splits[k].class_fractions() for k in split_names}
        for i, (name, px) in enumerate(zip(ls.names, report.class_pixels.tolist())):
            style = "red" if px == 0 else None
            t.add_row(str(i), name, f"{px:,}", f"{100 * px / total:.2f}",
                      *(f"{100 * fractions[k][i]:.2f}" for k in split_names), style=style)
        t.add_row(str(ls.ignore_index), "(ignore)", f"{report.ignore_pixels:,}",
                  f"{100 * report.ignore_pixels / total:.2f}",
                  *(f"{100 * report.splits[k].ignore_fraction:.2f}" for k in split_names), style="dim")
        console.print(t)
        never = report.never_present()
        if never:
            console.print(f"[yellow]Classes never present:[/yellow] {', '.join(never)}")
        for k in split_names:
            missing = [n for n in report.never_present(k) if n not in never]
            if missing:
                console.print(f"[yellow]Absent from {k}:[/yellow] {', '.join(missing)}")
        console.print(f"Decoded cache would take {format_bytes(report.cache_bytes)}")

    if report.problems:
        # One line per problem, not a table: a path must never be folded across lines, so the
        # lines can be grepped and copied from a log. A problem every split shares is one line.
        splits: dict[tuple[str, str], list[str]] = {}
        for p in report.problems:
            splits.setdefault((str(p.path) if p.path is not None else "", p.message), []).append(p.split or "")
        for (path, message), where in list(splits.items())[:max_rows]:
            named = ", ".join(w for w in where if w)
            line = f"{path}: {message}" if path else message
            console.print(f"[red]error:[/red] {escape(line)}" + (f"  ({escape(named)})" if named else ""),
                          soft_wrap=True)
        hidden = len(splits) - min(len(splits), max_rows)
        if hidden > 0:
            console.print(f"... and {hidden} more problem(s)")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")

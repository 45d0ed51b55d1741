"""Turning metrics into something to read: a terminal table, JSON, Markdown.

All three show percentages with undefined values (NaN, see
:mod:`everseg.evaluate.metrics`) as a dash in tables and ``null`` in JSON.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from everseg.atomic import atomic_write_text
from everseg.evaluate.metrics import SegmentationMetrics, class_names_for

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from everseg.data.labelspace import LabelSpace

__all__ = ["metrics_markdown", "print_metrics_table", "write_metrics_json"]

_DASH = "—"


def _pct(x: float, decimals: int = 2) -> str:
    return _DASH if x is None or math.isnan(x) else f"{x:.{decimals}f}"


def _summary_rows(metrics: SegmentationMetrics,
                  decimals: int) -> list[tuple[str, str, str, str, str]]:
    """(label, IoU, Dice, precision, recall) rows under the per-class ones; the means
    line up with their columns, the single numbers go in the first column."""
    mean_precision = metrics.precision[~np.isnan(metrics.precision)]
    mp = float(mean_precision.mean()) if mean_precision.size else math.nan
    return [
        ("mean", _pct(metrics.miou, decimals), _pct(metrics.mean_dice, decimals),
         _pct(mp, decimals), _pct(metrics.mean_class_accuracy, decimals)),
        ("frequency-weighted IoU", _pct(metrics.fwiou, decimals), "", "", ""),
        ("pixel accuracy", _pct(metrics.pixel_accuracy, decimals), "", "", ""),
    ]


def print_metrics_table(metrics: SegmentationMetrics, label_space: "LabelSpace | None" = None,
                        console: "Console | None" = None, *, title: str | None = None,
                        decimals: int = 2) -> "Table":
    """Print a rich table: one row per class (IoU, Dice, precision, recall, true
    pixels), then the means, frequency-weighted IoU and pixel accuracy.

    Prints to ``console`` (a new stdout console when None) and returns the table.
    """
    from rich.console import Console
    from rich.table import Table

    names = class_names_for(metrics.num_classes, label_space)
    table = Table(title=title or f"Segmentation metrics (%), {metrics.num_pixels:,} pixels",
                  show_footer=False)
    table.add_column("class", style="bold")
    for col in ("IoU", "Dice", "precision", "recall", "pixels"):
        table.add_column(col, justify="right")
    true_px = metrics.true_pixels
    for i, name in enumerate(names):
        undefined = math.isnan(metrics.iou[i])
        table.add_row(
            name, _pct(metrics.iou[i], decimals), _pct(metrics.dice[i], decimals),
            _pct(metrics.precision[i], decimals), _pct(metrics.recall[i], decimals),
            f"{int(true_px[i]):,}", style="dim" if undefined else None,
        )
    table.add_section()
    for label, *values in _summary_rows(metrics, decimals):
        table.add_row(label, *values, "", style="bold")
    (console or Console(emoji=False)).print(table)
    return table


def metrics_markdown(metrics: SegmentationMetrics, label_space: "LabelSpace | None" = None, *,
                     decimals: int = 2) -> str:
    """A GitHub-flavoured Markdown table of the same numbers as :func:`print_metrics_table`."""
    names = class_names_for(metrics.num_classes, label_space)

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| class | IoU | Dice | precision | recall | pixels |",
             "|:--|--:|--:|--:|--:|--:|"]
    for i, name in enumerate(names):
        lines.append(f"| {esc(name)} | {_pct(metrics.iou[i], decimals)} | "
                     f"{_pct(metrics.dice[i], decimals)} | {_pct(metrics.precision[i], decimals)} | "
                     f"{_pct(metrics.recall[i], decimals)} | {int(metrics.true_pixels[i])} |")
    for label, iou, dice, prec, rec in _summary_rows(metrics, decimals):
        lines.append(f"| **{label}** | {iou} | {dice} | {prec} | {rec} | |")
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf with None and numpy / torch scalars and arrays with Python ones."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy / torch
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Atomically write ``data`` as JSON (temp file + ``os.replace``); NaN/inf become null."""
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def write_metrics_json(path: str | os.PathLike[str], metrics: SegmentationMetrics,
                       label_space: "LabelSpace | None" = None, extra: dict[str, Any] | None = None,
                       *, include_confusion: bool = True) -> Path:
    """Write ``metrics.to_dict(label_space)`` (percent values) as JSON.

    The write is atomic (a temporary file beside ``path``, then ``os.replace``),
    so a reader never sees half a file; NaN anywhere (also in ``extra``) becomes ``null``.

    ``extra`` entries (run settings, timing, checkpoint name, ...) are added at
    the top level; they may not overwrite metric keys. The confusion matrix is
    included as ``confusion_matrix`` unless ``include_confusion=False``.
    """
    data = metrics.to_dict(label_space, include_confusion=include_confusion)
    if label_space is not None:
        data["classes"] = list(label_space.names)
        data["ignore_index"] = label_space.ignore_index
    if extra:
        clash = sorted(set(extra) & set(data))
        if clash:
            raise ValueError(f"extra keys {clash} would overwrite metric keys")
        data.update(extra)
    return _write_json(path, data)

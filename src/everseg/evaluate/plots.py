"""Pictures of predictions and scores: coloured masks, overlays, comparisons, bar
charts and confusion matrices.

Figures are drawn with :class:`matplotlib.figure.Figure` and saved through the
Agg renderer directly, never through ``pyplot``: nothing opens a window,
nothing changes the process-wide matplotlib backend, and figures are freed as
soon as they go out of scope (no global figure registry to leak into).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from everseg.evaluate.confusion import ConfusionMatrix
from everseg.evaluate.metrics import SegmentationMetrics, class_names_for

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from everseg.data.labelspace import LabelSpace

__all__ = [
    "colorize",
    "overlay",
    "plot_confusion_matrix",
    "plot_per_class_iou",
    "save_comparison",
    "with_legend",
]


# ---------------------------------------------------------------------------- arrays
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _mask_array(mask: Any) -> np.ndarray:
    m = _to_numpy(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"a mask must be H x W, got shape {m.shape}")
    if m.dtype.kind not in "iu":
        raise TypeError(f"a mask must hold integer class ids, got dtype {m.dtype}")
    if m.size and (m.min() < 0 or m.max() > 255):
        raise ValueError(f"mask values must lie in [0, 255], got [{m.min()}, {m.max()}]")
    return m.astype(np.int64)


def _image_array(image: Any) -> np.ndarray:
    """Any image to uint8 ``H x W x 3``.

    Torch tensors are read as ``C x H x W`` (the torch convention), numpy arrays
    as ``H x W x C`` unless the first axis has 1 or 3 entries and the last does
    not. Floats are taken to be in ``[0, 1]``.
    """
    is_tensor = isinstance(image, torch.Tensor)
    a = _to_numpy(image)
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.ndim == 3 and (is_tensor or (a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3))):
        a = np.moveaxis(a, 0, -1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"an image must be 3 x H x W (torch) or H x W x 3, got shape {np.shape(image)}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype.kind == "f":
        return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def _lookup_table(label_space: "LabelSpace") -> np.ndarray:
    """256 x 3 colours: the palette for class ids, black for everything else."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: label_space.num_classes] = np.asarray(label_space.palette, dtype=np.uint8)
    return lut


def colorize(mask: Any, label_space: "LabelSpace") -> np.ndarray:
    """Class-id mask ``H x W`` -> uint8 ``H x W x 3`` in the label space's palette.

    The ignore index (and any id without a class) is drawn black.
    """
    return _lookup_table(label_space)[_mask_array(mask)]


def overlay(image: Any, mask: Any, label_space: "LabelSpace", alpha: float = 0.5) -> np.ndarray:
    """The image with the mask's class colours blended in at opacity ``alpha``.

    ``image``: uint8 or float ``3 x H x W`` tensor, or ``H x W x 3`` array. Pixels
    without a class (ignore index) keep the plain image. Returns uint8 ``H x W x 3``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _image_array(image)
    m = _mask_array(mask)
    if img.shape[:2] != m.shape:
        raise ValueError(f"image size {img.shape[:2]} != mask size {m.shape}")
    table = _lookup_table(label_space).astype(np.float32)
    out = np.empty_like(img, dtype=np.uint8)
    # In blocks of rows: float copies of a whole 6000 x 6000 photo would take 1.7 GB.
    rows = max(1, 2**20 // max(1, img.shape[1]))
    for top in range(0, img.shape[0], rows):
        part, ids = img[top:top + rows].astype(np.float32), m[top:top + rows]
        blended = (1.0 - alpha) * part + alpha * table[ids]
        mixed = np.where((ids < label_space.num_classes)[..., None], blended, part)
        out[top:top + rows] = (mixed + 0.5).clip(0, 255)
    return out


def with_legend(picture: np.ndarray, mask: Any, label_space: "LabelSpace") -> np.ndarray:
    """``picture`` (uint8 ``H x W x 3``, e.g. an :func:`overlay`) with a legend on its right:
    a colour swatch, name and share of the labelled pixels for each class in ``mask``,
    largest first. The legend grows the picture downwards when it needs more height."""
    from PIL import Image, ImageDraw, ImageFont

    m = _mask_array(mask)
    counts = np.bincount(m[m < label_space.num_classes].ravel(), minlength=label_space.num_classes)
    total = max(1, int(counts.sum()))
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    h, w = picture.shape[:2]
    row = max(14, min(28, round(h / 24)))
    try:
        font = ImageFont.load_default(size=row - 4)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    lines = [f"{label_space.names[c]}  {100 * counts[c] / total:.1f}%" for c in present] or ["no class"]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(t, font=font)) for t in lines)
    pad = row // 3
    panel_w = pad * 3 + row + text_w
    height = max(h, pad * 2 + row * len(lines))
    canvas = Image.new("RGB", (w + panel_w, height), "white")
    canvas.paste(Image.fromarray(np.ascontiguousarray(picture)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(lines):
        y = pad + k * row
        if present:
            colour = tuple(int(v) for v in label_space.palette[present[k]])
            draw.rectangle([w + pad, y + 2, w + pad + row - 4, y + row - 2], fill=colour, outline=(60, 60, 60))
        draw.text((w + pad * 2 + row, y + 1), text, fill=(20, 20, 20), font=font)
    return np.asarray(canvas)


# ---------------------------------------------------------------------------- figures
def _new_figure(width_px: int, height_px: int, dpi: int, **kwargs: Any) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, **kwargs)


def _save(fig: "Figure", path: str | os.PathLike[str], dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": the saved size is exactly figsize * dpi.
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _rgb01(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    return (colour[0] / 255.0, colour[1] / 255.0, colour[2] / 255.0)


def save_comparison(path: str | os.PathLike[str], image: Any, truth: Any | None, pred: Any,
                    label_space: "LabelSpace", *, title: str | None = None,
                    panel_width: int | None = None, dpi: int = 100) -> Path:
    """Save ``image | truth | prediction`` side by side as a PNG, with a legend of
    the classes that appear in either mask (and "ignore" when truth has unlabelled pixels).

    ``truth=None`` leaves out the middle panel. Each panel is ``panel_width``
    pixels wide (default: the image width clamped to [256, 640]) and keeps the
    image's aspect ratio; masks are drawn with nearest-neighbour sampling so
    class colours stay exact.
    """
    from matplotlib.patches import Patch

    img = _image_array(image)
    h, w = img.shape[:2]
    panels: list[tuple[str, np.ndarray]] = [("image", img)]
    present: set[int] = set()
    has_ignore = False
    for name, mask in (("truth", truth), ("prediction", pred)):
        if mask is None:
            continue
        m = _mask_array(mask)
        if m.shape != (h, w):
            raise ValueError(f"{name} size {m.shape} != image size {(h, w)}")
        values = np.unique(m)
        present.update(int(v) for v in values if v < label_space.num_classes)
        has_ignore |= bool((values >= label_space.num_classes).any())
        panels.append((name, colorize(m, label_space)))

    pw = int(panel_width) if panel_width else int(min(max(w, 256), 640))
    ph = max(1, round(h * pw / w))
    gap, label_h, header_h = 8, 24, (30 if title else 0)
    handles = [Patch(facecolor=_rgb01(label_space.palette[c]), edgecolor="0.3",
                     label=label_space.names[c]) for c in sorted(present)]
    if has_ignore:
        handles.append(Patch(facecolor="black", edgecolor="0.3", label="ignore"))
    ncol = max(1, min(len(handles), (len(panels) * pw) // 150))
    rows = math.ceil(len(handles) / ncol) if handles else 0
    legend_h = 12 + 22 * rows if rows else 0
    fig_w = len(panels) * pw + (len(panels) + 1) * gap
    fig_h = header_h + label_h + ph + gap + legend_h + gap

    fig = _new_figure(fig_w, fig_h, dpi, facecolor="white")
    bottom = gap + legend_h + gap
    for k, (name, pixels) in enumerate(panels):
        left = gap + k * (pw + gap)
        ax = fig.add_axes((left / fig_w, bottom / fig_h, pw / fig_w, ph / fig_h))
        ax.imshow(pixels, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        fig.text((left + pw / 2) / fig_w, (bottom + ph + 5) / fig_h, name, ha="center",
                 va="bottom", fontsize=11)
    if title:
        fig.text(0.5, 1 - 6 / fig_h, title, ha="center", va="top", fontsize=12, weight="bold")
    if handles:
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, gap / fig_h),
                   ncol=ncol, frameon=False, fontsize=9, handlelength=1.2, columnspacing=1.0)
    return _save(fig, path, dpi)


def plot_per_class_iou(path: str | os.PathLike[str], metrics: SegmentationMetrics,
                       label_space: "LabelSpace | None" = None, *, sort: bool = True,
                       figsize: tuple[float, float] | None = None, dpi: int = 100,
                       title: str | None = None) -> Path:
    """Horizontal bar chart of per-class IoU (%) with the value on each bar and a
    dashed line at the mIoU.

    ``sort=True`` puts the best class on top (undefined classes, drawn as "n/a",
    at the bottom); ``sort=False`` keeps class order from top to bottom. The PNG
    is exactly ``figsize * dpi`` pixels; the default height grows with the
    number of classes.
    """
    names = class_names_for(metrics.num_classes, label_space)
    iou = metrics.iou
    order = list(range(metrics.num_classes))
    if sort:
        order.sort(key=lambda i: (math.isnan(iou[i]), -np.nan_to_num(iou[i], nan=0.0)))
    n = len(order)
    figsize = figsize or (8.0, max(2.5, 0.28 * n + 1.3))
    fig = _new_figure(round(figsize[0] * dpi), round(figsize[1] * dpi), dpi, layout="constrained")
    ax = fig.add_subplot()
    ypos = np.arange(n)[::-1]  # first in `order` at the top
    values = np.array([0.0 if math.isnan(iou[i]) else iou[i] for i in order])
    if label_space is not None:
        colours = [_rgb01(label_space.palette[i]) for i in order]
    else:
        colours = ["tab:blue"] * n
    ax.barh(ypos, values, color=colours, edgecolor="0.25", linewidth=0.5)
    for y, i, v in zip(ypos, order, values):
        text = "n/a" if math.isnan(iou[i]) else f"{v:.1f}"
        ax.text(v + 1.0, y, text, va="center", fontsize=8)
    if not math.isnan(metrics.miou):
        ax.axvline(metrics.miou, color="0.2", linestyle="--", linewidth=1,
                   label=f"mIoU {metrics.miou:.1f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(ypos, [names[i] for i in order], fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title or "IoU per class")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path, dpi)


def _matrix_array(matrix: Any) -> np.ndarray:
    if isinstance(matrix, ConfusionMatrix):
        matrix = matrix.matrix
    elif isinstance(matrix, SegmentationMetrics):
        matrix = matrix.confusion
    m = _to_numpy(matrix).astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    return m


def plot_confusion_matrix(path: str | os.PathLike[str], matrix: Any,
                          label_space: "LabelSpace | None" = None, *, normalize: bool = True,
                          figsize: tuple[float, float] | None = None, dpi: int = 100,
                          annotate: bool | None = None, title: str | None = None) -> Path:
    """Heat map of a confusion matrix (rows = truth, columns = prediction).

    ``matrix``: a ConfusionMatrix, SegmentationMetrics, tensor or array.
    ``normalize=True`` divides each row by its total, so a cell is the share (%)
    of that true class predicted as the column class and the diagonal is the
    recall; rows of classes absent from the truth stay blank. ``annotate``
    writes the value in each cell (default: when there are at most 20 classes).
    The PNG is exactly ``figsize * dpi`` pixels.
    """
    m = _matrix_array(matrix)
    n = m.shape[0]
    names = class_names_for(n, label_space)
    if normalize:
        rows = m.sum(axis=1, keepdims=True)
        shown = np.full_like(m, np.nan)
        np.divide(m, rows, out=shown, where=rows > 0)
        shown *= 100.0
    else:
        shown = m
    annotate = n <= 20 if annotate is None else annotate
    side = min(max(4.0, 0.45 * n + 2.5), 30.0)
    figsize = figsize or (side + 1.2, side)
    fig = _new_figure(round(figsize[0] * dpi), round(figsize[1] * dpi), dpi, layout="constrained")
    ax = fig.add_subplot()

    from matplotlib import colormaps

    cmap = colormaps["Blues"].with_extremes(bad="white")
    vmax = 100.0 if normalize else max(float(np.nanmax(shown)) if shown.size else 1.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=0.0, vmax=vmax,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="% of true class" if normalize else "pixels")
    if annotate:
        for r in range(n):
            for c in range(n):
                v = shown[r, c]
                if math.isnan(v):
                    continue
                text = f"{v:.1f}" if normalize else f"{int(v)}"
                ax.text(c, r, text, ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 * vmax else "black")
    ticks = np.arange(n)
    ax.set_xticks(ticks, names, rotation=90, fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title or ("Confusion matrix (row-normalised, %)" if normalize else
                           "Confusion matrix (pixels)"))
    return _save(fig, path, dpi)

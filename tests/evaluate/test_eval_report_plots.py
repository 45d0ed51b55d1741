"""Reports (table, JSON, Markdown) and plots (valid PNGs of the expected size and colours)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from everseg.data.labelspace import LabelSpace
from everseg.evaluate import (ConfusionMatrix, SegmentationMetrics, colorize, metrics_markdown,
                              overlay, plot_confusion_matrix, plot_per_class_iou,
                              print_metrics_table, save_comparison, write_metrics_json)

LS = LabelSpace(("road", "car", "sky", "tree"),
                palette=((128, 64, 128), (0, 0, 142), (70, 130, 180), (107, 142, 35)))
# Class "tree" is absent from truth and prediction: undefined IoU.
MATRIX = [[3, 1, 0, 0], [1, 2, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]]


@pytest.fixture()
def metrics() -> SegmentationMetrics:
    return SegmentationMetrics.from_confusion(MATRIX)


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


# ---------------------------------------------------------------------------- reports
def test_json_is_valid_and_in_percent(tmp_path, metrics):
    path = write_metrics_json(tmp_path / "out" / "metrics.json", metrics, LS,
                              extra={"checkpoint": "step0", "seconds": float("nan")})
    text = path.read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["miou"] == pytest.approx(100 * 5 / 9)
    assert data["per_class_iou"]["road"] == pytest.approx(60.0)
    assert data["per_class_iou"]["tree"] is None
    assert data["pixel_accuracy"] == pytest.approx(70.0)
    assert data["num_pixels"] == 10
    assert data["confusion_matrix"] == MATRIX
    assert data["classes"] == list(LS.names)
    assert data["checkpoint"] == "step0" and data["seconds"] is None
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left
    with pytest.raises(ValueError):
        write_metrics_json(path, metrics, LS, extra={"miou": 1.0})


def test_json_write_replaces_an_existing_file(tmp_path, metrics):
    path = tmp_path / "m.json"
    path.write_text("old")
    write_metrics_json(path, metrics)
    assert json.loads(path.read_text())["per_class_iou"]["0"] == pytest.approx(60.0)


def test_rich_table_lists_every_class_and_the_means(metrics):
    console = Console(file=io.StringIO(), width=120, color_system=None)
    table = print_metrics_table(metrics, LS, console=console)
    text = console.file.getvalue()
    for name in LS.names:
        assert name in text
    assert "55.56" in text  # mIoU
    assert "70.00" in text  # pixel accuracy
    assert "—" in text  # undefined IoU of "tree"
    assert table.row_count == 4 + 3


def test_markdown_table(metrics):
    md = metrics_markdown(metrics, LS)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| class | IoU |")
    assert "| road | 60.00 | 75.00 | 75.00 | 75.00 | 4 |" in lines
    assert any(line.startswith("| **mean** | 55.56 |") for line in lines)
    assert "| tree | — |" in md


# ---------------------------------------------------------------------------- plots
def test_colorize_uses_the_palette_and_black_for_ignore():
    mask = torch.tensor([[0, 1], [3, 255]])
    rgb = colorize(mask, LS)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [128, 64, 128]
    assert rgb[1, 0].tolist() == [107, 142, 35]
    assert rgb[1, 1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        colorize(torch.tensor([[300]]), LS)


def test_overlay_blends_labelled_pixels_only():
    image = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    mask = torch.tensor([[1, 255], [0, 0]])
    out = overlay(image, mask, LS, alpha=0.5)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [50, 50, 121]  # (100 + (0, 0, 142)) / 2, rounded
    assert out[0, 1].tolist() == [100, 100, 100]  # ignore: the image shows through
    float_image = torch.full((3, 2, 2), 100 / 255)
    assert overlay(float_image, mask, LS).tolist() == out.tolist()
    with pytest.raises(ValueError):
        overlay(image, torch.zeros(3, 3, dtype=torch.long), LS)


def test_save_comparison_png(tmp_path):
    h, w = 20, 32
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[0] = 255  # pure red photo
    truth = torch.full((h, w), 2)  # all sky
    truth[:4] = 255  # a band of unlabelled pixels at the top
    pred = torch.zeros(h, w, dtype=torch.long)  # all road
    path = save_comparison(tmp_path / "cmp.png", image, truth, pred, LS, title="img0",
                           panel_width=256)
    width, height = png_size(path)
    assert width >= 3 * 256 and height >= 256 * h // w
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB"))
    # Panels start 8 px from the left, 256 px wide, 8 px apart; sample their centre columns.
    centres = [8 + 128 + k * (256 + 8) for k in range(3)]
    rows_with_red = np.where(np.all(px[:, centres[0]] == [255, 0, 0], axis=-1))[0]
    assert rows_with_red.size > 100  # the image panel is drawn at 256 x 160 pixels
    row = int(rows_with_red[rows_with_red.size * 3 // 4])  # low enough to miss the ignore band
    assert px[row, centres[0]].tolist() == [255, 0, 0]
    assert px[row, centres[1]].tolist() == list(LS.palette[2])  # truth: sky
    assert px[row, centres[2]].tolist() == list(LS.palette[0])  # prediction: road

    two = save_comparison(tmp_path / "pred_only.png", image, None, pred, LS)
    assert png_size(two)[0] < width


def test_per_class_iou_plot_size(tmp_path, metrics):
    for sort in (True, False):
        path = plot_per_class_iou(tmp_path / f"iou_{sort}.png", metrics, LS, sort=sort,
                                  figsize=(6, 3), dpi=80)
        assert png_size(path) == (480, 240)
    default = plot_per_class_iou(tmp_path / "iou.png", metrics)
    assert png_size(default)[0] == 800


def test_confusion_matrix_plot_size(tmp_path, metrics):
    cm = ConfusionMatrix(4).update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    for normalize, source in ((True, cm), (False, metrics), (True, np.array(MATRIX))):
        path = plot_confusion_matrix(tmp_path / "cm.png", source, LS, normalize=normalize,
                                     figsize=(5, 4), dpi=100)
        assert png_size(path) == (500, 400)
    with pytest.raises(ValueError):
        plot_confusion_matrix(tmp_path / "bad.png", np.zeros((2, 3)))

"""The jobs the command line runs, as plain functions: evaluate a model, predict files, the demo.

The CLI only parses arguments and calls these, so everything it does can be done from Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from everseg.atomic import atomic_write
from everseg.data.dataset import SegmentationDataset
from everseg.data.io import read_image


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model folder (``config.json`` inside) or a training run folder holding ``model/``."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise FileNotFoundError(f"{path}: not an everseg model folder (no config.json, nor model/config.json)")


def load_trained_model(path: str | Path) -> torch.nn.Module:
    from everseg.models import load_model

    return load_model(resolve_model_dir(path))


def evaluate_model(model: torch.nn.Module, dataset: SegmentationDataset, *, out_dir: str | Path | None = None,
                   json_path: str | Path | None = None, overlays: int = 0, mode: str = "whole",
                   crop_size: tuple[int, int] | None = None, flip: bool = False,
                   scales: Sequence[float] = (1.0,), bf16: bool | None = None, progress: bool = True,
                   console: Any = None) -> Any:
    """Evaluate, print the table, write JSON, plots and ``overlays`` comparison images."""
    from everseg.evaluate import (evaluate, plot_confusion_matrix, plot_per_class_iou,
                                  print_metrics_table, save_comparison, write_metrics_json)
    from everseg.learn.trainer import cpu_has_native_bf16

    bf16 = cpu_has_native_bf16() if bf16 is None else bf16
    out = Path(out_dir) if out_dir is not None else None
    saved: list[Path] = []

    def save_overlays(items: list[dict[str, Any]], preds: torch.Tensor) -> None:
        for item, pred in zip(items, preds):
            if out is None or len(saved) >= overlays:
                return
            path = out / "overlays" / f"{item['stem']}.png"
            save_comparison(path, item["image"].permute(1, 2, 0).numpy(), item["mask"].numpy(),
                            pred.cpu().numpy(), model.label_space)
            saved.append(path)

    result = evaluate(model, dataset, mode=mode, crop_size=crop_size, flip=flip, scales=scales,
                      autocast_bf16=bf16, channels_last=True, progress=progress,
                      on_batch=save_overlays if overlays and out is not None else None)
    ls = result.label_space or model.label_space
    print_metrics_table(result.metrics, ls, console=console)
    extra = {"dataset": dataset.name, "num_images": result.num_images,
             "images_per_second": result.images_per_second, "settings": result.settings}
    if json_path is not None:
        write_metrics_json(json_path, result.metrics, ls, extra=extra)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_metrics_json(out / "metrics.json", result.metrics, ls, extra=extra)
        plot_per_class_iou(out / "per_class_iou.png", result.metrics, ls)
        plot_confusion_matrix(out / "confusion_matrix.png", result.confusion.matrix, ls, normalize=True)
    result.overlay_paths = saved
    return result


def save_index_png(path: str | Path, mask: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> Path:
    """A palette PNG: pixel values are class ids, viewers show the class colours."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [c for rgb in palette for c in rgb]
    img.putpalette(flat + [0, 0, 0] * (256 - len(palette)))
    return atomic_write(path, lambda p: img.save(p, format="PNG"))


def predict_files(model: torch.nn.Module, images: Sequence[str | Path], out_dir: str | Path, *,
                  mode: str = "whole", crop_size: tuple[int, int] | None = None, flip: bool = False,
                  scales: Sequence[float] = (1.0,), bf16: bool | None = None) -> list[tuple[Path, Path]]:
    """Write ``<stem>_mask.png`` (class ids, palette PNG) and ``<stem>_overlay.png`` per image."""
    from everseg.evaluate import overlay, predict
    from everseg.learn.trainer import cpu_has_native_bf16

    bf16 = cpu_has_native_bf16() if bf16 is None else bf16
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        rgb = read_image(path)
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
        pred = predict(model, x, mode=mode, crop_size=crop_size, flip=flip, scales=scales,
                       autocast_bf16=bf16, channels_last=True)[0].numpy()
        stem = Path(path).stem
        mask_path = save_index_png(out / f"{stem}_mask.png", pred, model.label_space.palette)
        blend = overlay(rgb, pred, model.label_space)
        overlay_path = atomic_write(out / f"{stem}_overlay.png",
                                    lambda p: Image.fromarray(blend).save(p, format="PNG"))
        written.append((mask_path, overlay_path))
    return written

"""Prediction on images too large to run whole, in bounded memory.

Whole-image inference holds the float image, the features and ``classes x H x W`` float
logits at once: a 6000x6000 photo needed a 1.7 GB allocation for the logits alone and
failed, and the sliding window of :mod:`everseg.evaluate.inference` keeps full-size
accumulators just the same. Here the image is cut into ``tile x tile`` cores, each run
with ``margin`` pixels of context on every side (so objects cut by a tile edge are still
seen whole enough), and only the core's class ids are kept: memory is that of one
``(tile + 2 margin)^2`` forward pass plus the uint8 result, whatever the image size.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from everseg.evaluate.inference import best_class, predict_probabilities

# Images with more pixels are tiled. Measured with MobileNetV2 + DeepLabV3+ (11 classes), above
# the 0.7 GB a process with torch holds anyway: 2048 x 1024 (Cityscapes) runs whole in 1.0 GB,
# 2048 x 2048 needed 1.9 GB, a tile (1024 core + 64 margins = 1152 x 1152) needs 0.6 GB.
WHOLE_IMAGE_MAX_PIXELS = 2_500_000
TILE = 1024
MARGIN = 64


def _starts(size: int, core: int) -> list[int]:
    return list(range(0, size, core))


def predict_image(model: nn.Module, image: np.ndarray, *, max_pixels: int = WHOLE_IMAGE_MAX_PIXELS,
                  tile: int = TILE, margin: int = MARGIN,
                  on_tile: Callable[[int, int], None] | None = None,
                  **infer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Class ids (uint8 ``H x W``) and the winning class's probability (float16 ``H x W``)
    for one RGB uint8 ``H x W x 3`` image.

    Images up to ``max_pixels`` run whole; larger ones in tiles (see the module docstring).
    ``infer``: the options of :func:`~everseg.evaluate.inference.predict_logits` (mode,
    crop_size, flip, scales, autocast_bf16, channels_last), applied to each tile.
    ``on_tile(done, total)`` reports progress on tiled images.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 H x W x 3 image, got {image.dtype} {image.shape}")
    if tile < 32 or margin < 0:
        raise ValueError(f"tile must be at least 32 and margin non-negative, got {tile}, {margin}")
    h, w = image.shape[:2]
    if h * w <= max_pixels:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        probs = predict_probabilities(model, x, **infer)[0]
        conf, ids = best_class(probs)
        return ids.to(torch.uint8).cpu().numpy(), conf.to(torch.float16).cpu().numpy()
    ids_out = np.empty((h, w), dtype=np.uint8)
    conf_out = np.empty((h, w), dtype=np.float16)
    cores = [(top, left) for top in _starts(h, tile) for left in _starts(w, tile)]
    win_h, win_w = min(h, tile + 2 * margin), min(w, tile + 2 * margin)
    for done, (top, left) in enumerate(cores, 1):
        bottom, right = min(top + tile, h), min(left + tile, w)
        # Every window has the same size (edge windows slide inwards, which gives their cores
        # more context, not less): buffers of one size are reused by the allocator, where
        # windows of many sizes grew the process by 0.6 GB over 9 tiles.
        t0 = min(max(0, top - margin), h - win_h)
        l0 = min(max(0, left - margin), w - win_w)
        t1, l1 = t0 + win_h, l0 + win_w
        x = torch.from_numpy(np.ascontiguousarray(image[t0:t1, l0:l1])).permute(2, 0, 1)[None]
        probs = predict_probabilities(model, x, **infer)[0]
        conf, ids = best_class(probs[:, top - t0:bottom - t0, left - l0:right - l0])
        ids_out[top:bottom, left:right] = ids.to(torch.uint8).cpu().numpy()
        conf_out[top:bottom, left:right] = conf.to(torch.float16).cpu().numpy()
        del probs, x
        if on_tile is not None:
            on_tile(done, len(cores))
    release_freed_memory()
    return ids_out, conf_out


def release_freed_memory() -> None:
    """Give memory freed by large temporaries back to the OS (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass

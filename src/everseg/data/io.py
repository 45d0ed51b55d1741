"""Reading images and label masks from disk, with the quirks real files have.

Images come back as uint8 H x W x 3 (RGB), masks as the raw label values
(H x W, or H x W x 3 for colour-coded masks) before any class mapping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from everseg.data.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(path, "is a folder, not an image file" if path.is_dir() else "file does not exist")
    try:
        img = Image.open(path)
        img.load()
    except Image.DecompressionBombError as exc:
        raise DataError(path, f"too large to decode safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"cannot be read as an image ({exc})") from exc
    return img


def check_labelled_pair(image: np.ndarray, mask: np.ndarray, num_classes: int, ignore_index: int = 255,
                        what: str = "image") -> None:
    """Raise ValueError unless ``image`` is RGB uint8 ``H x W x 3`` and ``mask`` a uint8 or integer
    ``H x W`` array of class ids below ``num_classes`` (or ``ignore_index``)."""
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{what}: expected an RGB uint8 H x W x 3 array, got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{what}: the mask is {mask.shape}, the image {image.shape[:2]}: they must be the same size")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{what}: the mask must hold integer class ids, got {mask.dtype}")
    bad = np.unique(mask[(mask != ignore_index) & ((mask < 0) | (mask >= num_classes))])
    if bad.size:
        raise ValueError(f"{what}: mask values {bad[:8].tolist()} are outside the class ids 0..{num_classes - 1} "
                         f"(and {ignore_index} = unlabelled)")


def _to_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        # 16-bit photographs use the full 0..65535 range; scale rather than clip.
        top = 65535 if arr.max(initial=0) > 255 else 255
        return (arr.astype(np.float64) * (255.0 / top) + 0.5).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        return (np.clip(arr, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    raise DataError(path, f"unsupported pixel type {arr.dtype}")


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 H x W x 3; EXIF orientation applied, grayscale/16-bit/alpha handled."""
    path = Path(path)
    img = _open(path)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose the image
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = _to_uint8(np.asarray(img), path)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays


def read_mask(path: str | Path, *, exif: bool = True) -> np.ndarray:
    """Raw label values: H x W (index, grayscale or 16-bit) or H x W x 3 (colour-coded).

    Palette ("P") PNGs give their palette indices, which is how VOC-style masks
    store class ids. 16-bit masks are returned unscaled (as int64), since their
    values are labels, not intensities.
    """
    path = Path(path)
    img = _open(path)
    if exif:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:
            pass
    mode = img.mode
    if mode in ("P", "L", "1"):
        arr = np.asarray(img)
        return arr.astype(np.uint8) if arr.dtype == bool else arr
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(img).astype(np.int64)
    if mode == "LA":
        return np.asarray(img.getchannel(0))
    if mode in ("RGB", "RGBA"):
        arr = np.asarray(img.convert("RGB"))
        # A colour mask whose three channels are equal is really grayscale.
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
            return np.ascontiguousarray(arr[..., 0])
        return arr
    raise DataError(path, f"unsupported mask image mode {mode!r}")

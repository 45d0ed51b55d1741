"""train_transform keeps image and mask aligned and pads the mask with ignore (255)."""

from __future__ import annotations

import random

import numpy as np
import torch

from everseg.data import IGNORE_INDEX, AugmentConfig, resize_transform, train_transform

PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180)], dtype=np.uint8)


def _scene(h: int = 72, w: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocky class map (regions of 12 px and more) and an image painted palette[mask]."""
    rng = np.random.default_rng(0)
    mask = np.kron(rng.integers(0, len(PALETTE), size=(h // 12, w // 12)), np.ones((12, 12), int))
    mask[30:50, 40:52] = 5  # a shape that does not follow the block grid
    image = PALETTE[mask]
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask.astype(np.uint8))


def _interior(mask: np.ndarray, margin: int = 2) -> np.ndarray:
    """Pixels whose (2*margin+1)^2 neighbourhood has one label only."""
    h, w = mask.shape
    pad = np.pad(mask.astype(int), margin, mode="edge")
    same = np.ones_like(mask, dtype=bool)
    for dy in range(-margin, margin + 1):
        for dx in range(-margin, margin + 1):
            same &= pad[margin + dy:margin + dy + h, margin + dx:margin + dx + w] == mask
    return same


def _colour_class(image: np.ndarray) -> np.ndarray:
    d = ((image[..., None, :].astype(int) - PALETTE[None, None].astype(int)) ** 2).sum(-1)
    return d.argmin(-1)


def test_geometry_keeps_image_and_mask_aligned():
    image, mask = _scene()
    cfg = AugmentConfig(crop_size=(64, 64), scale=(0.6, 1.6), hflip=True, rotation=25.0, color_jitter=0.0)
    tf = train_transform(cfg)
    random.seed(0)
    torch.manual_seed(0)
    checked = mismatched = padded = 0
    for _ in range(24):
        img_t, m_t = tf(image, mask)
        assert img_t.shape == (3, 64, 64) and m_t.shape == (64, 64) and img_t.dtype == torch.uint8
        img, m = img_t.permute(1, 2, 0).numpy(), m_t.numpy()
        assert set(np.unique(m).tolist()) <= set(range(len(PALETTE))) | {IGNORE_INDEX}
        inner = _interior(m)
        labelled = inner & (m != IGNORE_INDEX)
        checked += labelled.sum()
        mismatched += (_colour_class(img)[labelled] != m[labelled]).sum()
        fill = inner & (m == IGNORE_INDEX)
        padded += fill.sum()
        if fill.any():  # image padding/rotation fill is black where the mask says ignore
            assert np.median(img[fill].max(axis=1)) == 0
    assert checked > 24 * 1000
    assert mismatched / checked < 0.01, f"{mismatched}/{checked} pixels disagree"
    assert padded > 0  # scale < 1 and rotation produced padding, marked 255 in the mask


def test_small_image_is_padded_with_ignore():
    image, mask = _scene(24, 36)
    tf = train_transform(AugmentConfig(crop_size=(48, 48), scale=(1.0, 1.0), hflip=False))
    img_t, m_t = tf(image, mask)
    m = m_t.numpy()
    assert (m == IGNORE_INDEX).sum() == 48 * 48 - 24 * 36
    assert (img_t.permute(1, 2, 0).numpy()[m == IGNORE_INDEX] == 0).all()
    kept = m != IGNORE_INDEX
    assert (_colour_class(img_t.permute(1, 2, 0).numpy())[kept] == m[kept]).all()


def test_resize_transform_keeps_labels_nearest():
    image, mask = _scene()
    img_t, m_t = resize_transform((36, 48))(image, mask)
    assert img_t.shape == (3, 36, 48) and m_t.shape == (36, 48)
    assert set(np.unique(m_t.numpy()).tolist()) <= set(range(len(PALETTE)))


def _rare_class_scene(h: int = 96, w: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 everywhere but a 4x4 patch of class 3 in a corner, and an ignored band."""
    mask = np.zeros((h, w), np.uint8)
    mask[88:92, 4:8] = 3
    mask[:, 120:] = IGNORE_INDEX
    image = PALETTE[np.where(mask == IGNORE_INDEX, 1, mask)]
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)


def test_class_crops_find_a_small_class_that_random_crops_miss():
    image, mask = _rare_class_scene()
    random.seed(0)
    seen = {}
    for share in (0.0, 1.0):
        tf = train_transform(AugmentConfig(crop_size=(32, 32), scale=(1.0, 1.0), hflip=False, class_crops=share))
        hits = 0
        for _ in range(200):
            img_t, m_t = tf(image, mask)
            assert img_t.shape == (3, 32, 32) and m_t.shape == (32, 32)
            m = m_t.numpy()
            labelled = m != IGNORE_INDEX
            assert (_colour_class(img_t.permute(1, 2, 0).numpy())[labelled] == m[labelled]).all()
            hits += bool((m == 3).any())
        seen[share] = hits / 200
    # The patch is in about 1 random crop in 100; drawn among the image's two classes, in half.
    assert seen[0.0] < 0.1 and 0.4 < seen[1.0] < 0.6, seen


def test_class_crops_pad_a_small_image_and_skip_an_unlabelled_one():
    image, mask = _scene(24, 36)
    tf = train_transform(AugmentConfig(crop_size=(48, 48), scale=(1.0, 1.0), hflip=False, class_crops=1.0))
    img_t, m_t = tf(image, mask)
    m = m_t.numpy()
    assert (m == IGNORE_INDEX).sum() == 48 * 48 - 24 * 36 and (m[:24, :36] == mask.numpy()).all()
    blank = torch.full((40, 40), IGNORE_INDEX, dtype=torch.uint8)
    _, m_t = tf(torch.zeros(3, 40, 40, dtype=torch.uint8), blank)
    assert m_t.shape == (48, 48) and (m_t == IGNORE_INDEX).all()

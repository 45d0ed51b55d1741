"""The versioned registry and the feedback store: SQLite rows, atomic folders, leases, restarts."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from everseg.models import create_model
from everseg.models.versions import ModelRegistry, RegistryError
from everseg.serve.feedback import FeedbackStore, QueueFull, holder_is_gone, lease_holder_name
from everseg.serve.uploads import UploadError, read_image_upload, read_mask_upload


@pytest.fixture(scope="module")
def tiny_model():
    return create_model(arch="lraspp", backbone="mobilenet_v2", num_classes=3, pretrained=False)


def test_publish_activate_rollback_and_history(tiny_model, tmp_path):
    reg = ModelRegistry(tmp_path)
    assert reg.current is None
    v1 = reg.publish(tiny_model, info={"source": "initial"})
    v2 = reg.publish(tiny_model, parent=v1, info={"holdout_miou": 40.0},
                     save_extra=lambda d: (d / "memory").mkdir())
    assert (v1, v2, reg.current) == (1, 2, 2)
    assert (reg.path(2) / "memory").is_dir() and (reg.path(2) / "config.json").is_file()
    rejected = reg.publish(tiny_model, parent=v2, status="rejected", reason="holdout mIoU 30.0 < 39.0")
    assert reg.current == 2 and reg.entry(rejected)["status"] == "rejected"
    assert reg.rollback(reason="test") == 1 and reg.current == 1
    assert reg.activate(3) == 3  # an operator may serve a rejected candidate on purpose
    kinds = [e["kind"] for e in reg.events()]
    assert kinds == ["publish", "publish", "reject", "rollback", "activate"]
    with pytest.raises(RegistryError, match="no model version 9"):
        reg.activate(9)
    # Another process (here: another connection) sees the same state at once.
    other = ModelRegistry(tmp_path)
    assert other.current == 3 and [v["version"] for v in other.versions()] == [1, 2, 3]


def test_an_orphan_folder_of_a_killed_publish_is_replaced(tiny_model, tmp_path):
    reg = ModelRegistry(tmp_path)
    reg.publish(tiny_model)
    orphan = reg.path(2)
    orphan.mkdir(parents=True)
    (orphan / "half-written").write_text("x")
    assert reg.publish(tiny_model, parent=1) == 2
    assert not (orphan / "half-written").exists() and (orphan / "config.json").is_file()


def test_a_json_registry_of_earlier_versions_is_imported(tiny_model, tmp_path):
    from everseg.models import save_model

    save_model(tiny_model, tmp_path / "versions" / "v0001")
    (tmp_path / "registry.json").write_text(json.dumps(
        {"current": 1, "versions": [{"version": 1, "parent": None, "created": 1.0, "info": {"a": 1}}]}))
    reg = ModelRegistry(tmp_path)
    assert reg.current == 1 and reg.entry(1)["info"] == {"a": 1}


def test_feedback_is_stored_before_it_is_acknowledged_and_requeued_after_a_crash(tmp_path):
    store = FeedbackStore(tmp_path, max_queued=2)
    a = store.add(b"img-a", ".png", b"mask-a", height=2, width=3, new_classes=["Bollard"],
                  label_names=["x", "Bollard"], served_version=1)
    assert a.status == "queued" and a.image.read_bytes() == b"img-a" and a.mask.read_bytes() == b"mask-a"
    assert a.new_classes == ["Bollard"] and a.served_version == 1
    b = store.add(b"img-b", ".jpg", b"mask-b", height=2, width=3)
    with pytest.raises(QueueFull):
        store.add(b"img-c", ".png", b"mask-c", height=2, width=3)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = lease_holder_name().replace(f"|{os.getpid()}|", f"|{int(gone.stdout)}|")
    assert store.acquire_lease(dead, 30)
    store.update(a.id, status="training")
    # A new process (the server restarted after kill -9) finds both, the interrupted one queued
    # again as it takes the lease of the dead one, without waiting for the lease to expire.
    again = FeedbackStore(tmp_path)
    assert again.lease_holder() is None
    assert again.acquire_lease(lease_holder_name(), 30)
    assert [i.id for i in again.queued()] == [a.id, b.id]
    assert "interrupted" in again.get(a.id).detail
    with pytest.raises(ValueError, match="unknown feedback status"):
        again.update(a.id, status="done")


def _take_lease(root, holder, out):
    out.put(FeedbackStore(root).acquire_lease(holder, 30))


def test_only_one_process_holds_the_update_lease(tmp_path):
    store = FeedbackStore(tmp_path)
    assert store.acquire_lease("me", 30)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_take_lease, args=(str(tmp_path), "other", out))
    p.start()
    p.join(60)
    assert out.get(timeout=5) is False
    store.release_lease("me")
    assert FeedbackStore(tmp_path).acquire_lease("other", 0.2)
    time.sleep(0.3)
    assert store.acquire_lease("me", 30)  # an expired lease is free
    # A live process of this host keeps its lease; one of another host cannot be checked: it keeps it until it expires.
    mine = lease_holder_name()
    store.release_lease("me")
    assert store.acquire_lease(mine, 30)
    assert not holder_is_gone(mine) and not holder_is_gone("elsewhere|pid:[1]|12|abcdef")
    assert FeedbackStore(tmp_path).acquire_lease(lease_holder_name(), 30) is False


def _png(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_uploads_are_checked_before_they_are_decoded():
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)  # noise: no tiny PNG
    image, suffix = read_image_upload(_png(rgb), max_pixels=10_000)
    assert image.shape == (20, 30, 3) and suffix == ".png"
    assert read_image_upload(_png(rgb, "JPEG"), max_pixels=10_000)[1] == ".jpg"
    cases = [(b"", 400, "empty"), (b"GIF89a....", 400, "not a PNG or JPEG"), (_png(rgb)[:900], 400, "truncated"),
             (_png(rgb, "BMP"), 400, "BMP"), (_png(np.zeros((200, 300, 3), np.uint8)), 413, "limit")]
    for data, status, words in cases:
        with pytest.raises(UploadError, match=words) as err:
            read_image_upload(data, max_pixels=10_000)
        assert err.value.status == status
    # A decompression bomb: a tiny file whose header promises 40 gigapixels is refused unread.
    bomb = _png(np.zeros((1, 1), np.uint8))
    bomb = bomb[:16] + (200_000).to_bytes(4, "big") + (200_000).to_bytes(4, "big") + bomb[24:]
    with pytest.raises(UploadError) as err:
        read_image_upload(bomb, max_pixels=25_000_000)
    assert err.value.status in (400, 413)


def test_uploaded_pixels_are_pillows_whichever_decoder_reads_them():
    rgb = np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    gray = np.ascontiguousarray(rgb[..., 0])
    wide = (rgb.astype(np.uint16) * 257)
    for data in [_png(rgb), _png(rgb, "JPEG", quality=80), _png(gray), _png(np.dstack([rgb, gray])),
                 _png(gray, "JPEG"), _png(rgb, "PNG", transparency=(1, 2, 3))]:
        with Image.open(io.BytesIO(data)) as img:
            expected = np.asarray(img.convert("RGB"))
        got, _ = read_image_upload(data, max_pixels=10_000)
        assert got.shape == (24, 32, 3) and got.dtype == np.uint8 and (got == expected).all()
        assert got.flags.writeable
    buf = io.BytesIO()
    Image.fromarray(wide[..., 0]).save(buf, format="PNG")  # 16-bit grey: Pillow's conversion
    assert read_image_upload(buf.getvalue(), max_pixels=10_000)[0].shape == (24, 32, 3)
    with pytest.raises(UploadError, match="truncated") as err:
        jpeg = _png(np.tile(rgb, (8, 8, 1)), "JPEG")
        read_image_upload(jpeg[:len(jpeg) // 2], max_pixels=100_000)
    assert err.value.status == 400


def test_masks_must_match_their_image_and_the_label_space():
    ids = np.array([[0, 1], [2, 255]], np.uint8)
    assert (read_mask_upload(_png(ids), height=2, width=2, num_classes=3, max_pixels=100) == ids).all()
    gray_rgb = np.repeat(ids[..., None], 3, axis=2)  # what a browser canvas writes
    assert (read_mask_upload(_png(gray_rgb), height=2, width=2, num_classes=3, max_pixels=100) == ids).all()
    for data, kw, words in [(_png(ids), {"height": 3, "width": 2}, "is 2x2 but the image is 2x3"),
                            (_png(ids), {"height": 2, "width": 2, "num_classes": 2}, r"ids \[2\] outside"),
                            (_png(np.dstack([ids, ids * 0, ids])), {"height": 2, "width": 2}, "colour image"),
                            (_png(np.zeros((2, 2, 3), np.uint8), "JPEG"), {"height": 2, "width": 2}, "PNG")]:
        with pytest.raises(UploadError, match=words):
            read_mask_upload(data, **{"num_classes": 3, "max_pixels": 100, **kw})

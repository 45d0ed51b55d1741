"""Corrections waiting to teach the model, kept so that acknowledged means stored.

Each feedback item is an image, its corrected mask and optionally the names of new classes.
:meth:`FeedbackStore.add` writes both files (fsynced, under names the server makes up: no
client string becomes a path) and then commits the item's row; only then may the server
answer 202. A ``kill -9`` before the commit leaves orphan files and no row (the client got
no answer and retries); after it, the item is there and is processed after a restart.
Items in ``training`` when the process died go back to ``queued`` when the next worker takes
the update lease over.

The rows live in the registry's SQLite database (WAL), beside the model versions, so one
transaction can cover both. The update lease (:meth:`acquire_lease`) makes one process of
several (replicas of the server on one registry) the only one that trains.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from everseg.atomic import atomic_write
from everseg.database import connect, write_transaction

log = logging.getLogger(__name__)
STATUSES = ("queued", "training", "accepted", "rejected", "held_out", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    status TEXT NOT NULL,                -- queued | training | accepted | rejected | held_out | failed
    image TEXT NOT NULL,                 -- file names under <registry>/feedback/
    mask TEXT NOT NULL,
    height INTEGER NOT NULL,
    width INTEGER NOT NULL,
    new_classes TEXT NOT NULL DEFAULT '[]',   -- JSON list of names, ids following the known classes
    label_names TEXT NOT NULL DEFAULT '[]',   -- JSON: the class name of each mask id when it was sent
    served_version INTEGER,              -- the version whose prediction was scored against the mask
    feedback_miou REAL,                  -- that prediction's mIoU against the corrected mask
    version INTEGER,                     -- the version this item produced (accepted) or was kept as (rejected)
    holdout_miou_before REAL,
    holdout_miou_after REAL,
    seconds REAL,                        -- time the update took
    timings TEXT NOT NULL DEFAULT '{}',  -- JSON: where that time went (score_served, train, holdout, publish)
    detail TEXT                          -- why: rejection reason, failure, what it waits for
);
CREATE INDEX IF NOT EXISTS feedback_status ON feedback (status, id);
CREATE TABLE IF NOT EXISTS lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires REAL NOT NULL
);
"""


# Columns added after the first release of the table, with their declarations.
_ADDED_COLUMNS = {"timings": "TEXT NOT NULL DEFAULT '{}'"}


class QueueFull(RuntimeError):
    """The feedback queue holds as many items as it may; the client should retry later."""


@dataclass
class FeedbackItem:
    id: int
    created: float
    updated: float
    status: str
    image: Path
    mask: Path
    height: int
    width: int
    new_classes: list[str] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    served_version: int | None = None
    feedback_miou: float | None = None
    version: int | None = None
    holdout_miou_before: float | None = None
    holdout_miou_after: float | None = None
    seconds: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    detail: str | None = None

    def public(self) -> dict[str, Any]:
        """What ``GET /v1/feedback/{id}`` shows (no file paths)."""
        return {"id": self.id, "status": self.status, "created": self.created, "updated": self.updated,
                "new_classes": self.new_classes, "served_version": self.served_version,
                "feedback_miou": self.feedback_miou, "version": self.version,
                "holdout_miou_before": self.holdout_miou_before, "holdout_miou_after": self.holdout_miou_after,
                "seconds": self.seconds, "timings": self.timings, "detail": self.detail}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeedbackStore:
    def __init__(self, root: str | Path, *, max_queued: int = 1000):
        self.root = Path(root)
        self.files = self.root / "feedback"
        self.files.mkdir(parents=True, exist_ok=True)
        self.max_queued = max_queued
        self._lock = threading.RLock()
        self._con = connect(self.root / "registry.db")
        with self._lock:
            self._con.executescript(_SCHEMA)  # idempotent; executescript commits on its own
            have = {row[1] for row in self._con.execute("PRAGMA table_info(feedback)")}
            for column, decl in _ADDED_COLUMNS.items():  # a database made before the column existed
                if column not in have:
                    self._con.execute(f"ALTER TABLE feedback ADD COLUMN {column} {decl}")

    def _write(self):
        return write_transaction(self._con, self._lock)

    def _items(self, sql: str, args: tuple = ()) -> list[FeedbackItem]:
        with self._lock:
            cur = self._con.execute(sql, args)
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
        for r in rows:
            r["image"], r["mask"] = self.files / r["image"], self.files / r["mask"]
            r["new_classes"] = json.loads(r["new_classes"])
            r["label_names"] = json.loads(r["label_names"])
            r["timings"] = json.loads(r["timings"])
        return [FeedbackItem(**r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._con.close()

    # ------------------------------------------------------------------ the queue
    def add(self, image_bytes: bytes, image_suffix: str, mask_bytes: bytes, *, height: int, width: int,
            new_classes: list[str] | None = None, label_names: list[str] | None = None,
            served_version: int | None = None) -> FeedbackItem:
        """Store an item durably and return it (status ``queued``); raises :class:`QueueFull`.

        ``label_names``: the class of each mask id as the client meant it (the served classes,
        then ``new_classes``), so the ids still mean the same after the model has changed."""
        if image_suffix not in (".png", ".jpg"):
            raise ValueError(f"image suffix must be .png or .jpg, got {image_suffix!r}")
        if self.count("queued") >= self.max_queued:
            raise QueueFull(f"the feedback queue is full ({self.max_queued} items wait); retry later")
        name = uuid.uuid4().hex  # the server's own name: nothing the client sent becomes a path
        image, mask = f"{name}_image{image_suffix}", f"{name}_mask.png"
        atomic_write(self.files / image, lambda p: p.write_bytes(image_bytes))
        atomic_write(self.files / mask, lambda p: p.write_bytes(mask_bytes))
        _fsync_dir(self.files)  # the renames themselves are durable before the row says they exist
        now = time.time()
        with self._write() as con:
            cur = con.execute("INSERT INTO feedback (created, updated, status, image, mask, height, width, "
                              "new_classes, label_names, served_version) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                              (now, now, image, mask, height, width, json.dumps(list(new_classes or [])),
                               json.dumps(list(label_names or [])), served_version))
            item_id = cur.lastrowid
        return self.get(item_id)

    def get(self, item_id: int) -> FeedbackItem:
        found = self._items("SELECT * FROM feedback WHERE id = ?", (int(item_id),))
        if not found:
            raise KeyError(item_id)
        return found[0]

    def count(self, status: str | None = None) -> int:
        with self._lock:
            if status is None:
                return self._con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
            return self._con.execute("SELECT COUNT(*) FROM feedback WHERE status = ?", (status,)).fetchone()[0]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._con.execute("SELECT status, COUNT(*) FROM feedback GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | {s: n for s, n in rows}

    def queued(self, limit: int = 100) -> list[FeedbackItem]:
        """Items waiting, oldest first."""
        return self._items("SELECT * FROM feedback WHERE status = 'queued' ORDER BY id LIMIT ?", (limit,))

    def items(self, *, since_id: int = 0, limit: int = 1000) -> list[FeedbackItem]:
        return self._items("SELECT * FROM feedback WHERE id > ? ORDER BY id LIMIT ?", (since_id, limit))

    def update(self, item_id: int, **fields: Any) -> None:
        """Set columns of one item (``status`` among :data:`STATUSES`)."""
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown feedback status {fields['status']!r}")
        for key in ("new_classes", "label_names", "timings"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        fields["updated"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._write() as con:
            con.execute(f"UPDATE feedback SET {cols} WHERE id = ?", (*fields.values(), int(item_id)))

    @staticmethod
    def _requeue_training(con) -> int:
        return con.execute("UPDATE feedback SET status = 'queued', updated = ?, detail = "
                           "'requeued: the update was interrupted' WHERE status = 'training'",
                           (time.time(),)).rowcount

    def feedback_mious(self, version: int, limit: int | None = None) -> list[float]:
        """The feedback mIoU of predictions served by ``version``, most recent first."""
        sql = ("SELECT feedback_miou FROM feedback WHERE served_version = ? AND feedback_miou IS NOT NULL "
               "ORDER BY id DESC" + (" LIMIT ?" if limit else ""))
        with self._lock:
            rows = self._con.execute(sql, (version, limit) if limit else (version,)).fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ the update lease
    def acquire_lease(self, holder: str, seconds: float, name: str = "updates") -> bool:
        """Take or renew the lease ``name`` for ``seconds``; False while another live holder has it.

        A holder is gone when its lease expired or, sooner, when it names a process of this
        host and pid namespace that no longer exists (a server restarted after ``kill -9`` takes
        over at once instead of waiting out the lease). Taking the lease from a gone holder puts
        the items it was training back in the queue."""
        now = time.time()
        with self._write() as con:
            row = con.execute("SELECT holder, expires FROM lease WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != holder and row[1] > now and not holder_is_gone(row[0]):
                return False
            requeued = self._requeue_training(con) if row is None or row[0] != holder else 0
            con.execute("INSERT INTO lease (name, holder, expires) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE "
                        "SET holder = excluded.holder, expires = excluded.expires", (name, holder, now + seconds))
        if requeued:
            log.info("%d feedback item(s) interrupted by a stop were queued again", requeued)
        return True

    def release_lease(self, holder: str, name: str = "updates") -> None:
        with self._write() as con:
            con.execute("DELETE FROM lease WHERE name = ? AND holder = ?", (name, holder))

    def lease_holder(self, name: str = "updates") -> str | None:
        with self._lock:
            row = self._con.execute("SELECT holder, expires FROM lease WHERE name = ?", (name,)).fetchone()
        return row[0] if row is not None and row[1] > time.time() and not holder_is_gone(row[0]) else None


@functools.cache
def _this_host() -> tuple[str, str]:
    """Host name and pid namespace ("pid:[4026531836]"; containers have their own): asked for
    at every look at the lease, and the same for the life of the process."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return socket.gethostname(), namespace


def lease_holder_name() -> str:
    """A lease holder's name: host, pid namespace and pid say where it runs; the random tail
    tells two holders of one process apart."""
    host, namespace = _this_host()
    return f"{host}|{namespace}|{os.getpid()}|{uuid.uuid4().hex[:6]}"


def holder_is_gone(holder: str) -> bool:
    """True when ``holder`` (:func:`lease_holder_name`) is a process of this host and pid
    namespace that has exited. Elsewhere nothing can be told: its lease expires."""
    parts = holder.split("|")
    if len(parts) != 4 or not parts[1] or (parts[0], parts[1]) != _this_host():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        pass
    return False

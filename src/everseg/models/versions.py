"""Model versions on disk: numbered model folders, their lineage, and which one is active.

Layout::

    <root>/versions/v0001/      an everseg model folder (+ whatever was saved with it, e.g. memory/)
    <root>/registry.db          SQLite (WAL): one row per version, the active version, the history

Several processes may use one registry at once (the server's replicas, its update worker,
``everseg models activate`` from a shell): SQLite serialises the writes, and every reader
sees the active version another process set at its next look. A version folder is written
under a temporary name and renamed into place before its row is committed, so a version
that has a row is complete, and a crash at any moment leaves at worst an orphan folder that
the next publish removes. Rolling back or activating only moves the active pointer: nothing
is deleted. Candidates that were not accepted can be kept (``status="rejected"``) and listed
with the reason, without ever becoming active unless an operator activates one.

A registry written by earlier everseg versions (``registry.json``) is imported on first open.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from everseg.database import connect, write_transaction
from everseg.models.saving import load_model, save_model

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    parent INTEGER,
    created REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'published',   -- published | rejected
    reason TEXT,                                -- why a candidate was rejected
    info TEXT NOT NULL DEFAULT '{}'             -- JSON: what produced it, holdout scores, ...
);
CREATE TABLE IF NOT EXISTS registry_state (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS registry_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,                         -- publish | activate | rollback | auto-rollback
    version INTEGER,
    previous INTEGER,
    reason TEXT
);
"""


class RegistryError(ValueError):
    """A registry operation that cannot be done as asked (unknown version, nothing to roll back)."""


class ModelRegistry:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"{self.root}: registry must be a folder, this is a file")
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "registry.db"
        self._lock = threading.RLock()
        self._con = connect(self.db_path)
        with self._lock:
            self._con.executescript(_SCHEMA)  # idempotent; executescript commits on its own
        self._import_json_index()

    # ------------------------------------------------------------------ plumbing
    def _write(self):
        return write_transaction(self._con, self._lock)

    def _rows(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._con.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def path(self, version: int) -> Path:
        return self.root / "versions" / f"v{version:04d}"

    # ------------------------------------------------------------------ reading
    @property
    def current(self) -> int | None:
        """The active version (None before the first publish)."""
        rows = self._rows("SELECT value FROM registry_state WHERE key = 'active'")
        return int(rows[0]["value"]) if rows and rows[0]["value"] is not None else None

    def versions(self, *, include_rejected: bool = True) -> list[dict[str, Any]]:
        """Every version, oldest first: ``version``, ``parent``, ``created``, ``status``,
        ``reason``, ``info`` (a dict) and ``active``."""
        active = self.current
        where = "" if include_rejected else " WHERE status = 'published'"
        rows = self._rows(f"SELECT * FROM versions{where} ORDER BY version")
        for r in rows:
            r["info"] = json.loads(r["info"])
            r["active"] = r["version"] == active
        return rows

    def entry(self, version: int) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM versions WHERE version = ?", (int(version),))
        if not rows:
            known = [r["version"] for r in self._rows("SELECT version FROM versions ORDER BY version")]
            raise RegistryError(f"{self.root}: no model version {version} (versions: {known or 'none'})")
        row = rows[0]
        row["info"] = json.loads(row["info"])
        row["active"] = row["version"] == self.current
        return row

    def events(self) -> list[dict[str, Any]]:
        """The history of the active pointer: publish, activate, rollback, auto-rollback."""
        return self._rows("SELECT * FROM registry_events ORDER BY id")

    def load(self, version: int | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
        version = self.current if version is None else version
        if version is None:
            raise RegistryError(f"{self.root}: the registry has no model yet")
        self.entry(version)
        return load_model(self.path(version), map_location=map_location)

    # ------------------------------------------------------------------ writing
    def publish(self, model: nn.Module, *, parent: int | None = None, info: dict[str, Any] | None = None,
                activate: bool = True, status: str = "published", reason: str | None = None,
                save_extra: Callable[[Path], None] | None = None) -> int:
        """Save ``model`` as the next version; make it active when ``activate``.

        ``save_extra(folder)`` writes what belongs with the model (its replay memory) into the
        version's folder before it becomes visible. ``status="rejected"`` keeps a candidate that
        was not accepted, with its ``reason``; it is never activated by this call.
        """
        if status not in ("published", "rejected"):
            raise ValueError(f"status must be 'published' or 'rejected', got {status!r}")
        staging = self.root / "versions" / f".staging-{uuid.uuid4().hex}"
        model.metadata = {**(getattr(model, "metadata", None) or {}), "parent_version": parent}
        try:
            save_model(model, staging)
            if save_extra is not None:
                save_extra(staging)
            with self._write() as con:
                version = (con.execute("SELECT MAX(version) FROM versions").fetchone()[0] or 0) + 1
                target = self.path(version)
                if target.exists():  # an orphan of a publish killed before its commit
                    shutil.rmtree(target)
                staging.rename(target)
                con.execute("INSERT INTO versions (version, parent, created, status, reason, info) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (version, parent, time.time(), status, reason, json.dumps(info or {}, default=str)))
                con.execute("INSERT INTO registry_events (at, kind, version, previous, reason) VALUES (?, ?, ?, ?, ?)",
                            (time.time(), "publish" if status == "published" else "reject", version,
                             self._active(con), reason))
                if activate and status == "published":
                    self._set_active(con, version)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return version

    def annotate(self, version: int, info: dict[str, Any]) -> None:
        """Merge ``info`` into a version's info (e.g. its score on a holdout it was not scored on)."""
        with self._write() as con:
            row = con.execute("SELECT info FROM versions WHERE version = ?", (int(version),)).fetchone()
            if row is None:
                raise RegistryError(f"{self.root}: no model version {version}")
            merged = {**json.loads(row[0]), **info}
            con.execute("UPDATE versions SET info = ? WHERE version = ?",
                        (json.dumps(merged, default=str), int(version)))

    @staticmethod
    def _active(con: sqlite3.Connection) -> int | None:
        row = con.execute("SELECT value FROM registry_state WHERE key = 'active'").fetchone()
        return int(row[0]) if row and row[0] is not None else None

    @staticmethod
    def _set_active(con: sqlite3.Connection, version: int) -> None:
        con.execute("INSERT INTO registry_state (key, value) VALUES ('active', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(version),))

    def activate(self, version: int, *, kind: str = "activate", reason: str | None = None) -> int:
        """Make ``version`` the active one (any version, a rejected candidate included)."""
        with self._write() as con:
            if con.execute("SELECT 1 FROM versions WHERE version = ?", (int(version),)).fetchone() is None:
                raise RegistryError(f"{self.root}: no model version {version}")
            previous = self._active(con)
            self._set_active(con, int(version))
            con.execute("INSERT INTO registry_events (at, kind, version, previous, reason) VALUES (?, ?, ?, ?, ?)",
                        (time.time(), kind, int(version), previous, reason))
        return int(version)

    def rollback(self, version: int | None = None, *, reason: str | None = None,
                 kind: str = "rollback") -> int:
        """Make ``version`` (default: the active version's parent) active again."""
        if version is None:
            current = self.current
            if current is None:
                raise RegistryError(f"{self.root}: nothing to roll back: the registry has no model yet")
            version = self.entry(current)["parent"]
            if version is None:
                raise RegistryError(f"{self.root}: version {current} has no parent to roll back to")
        return self.activate(version, kind=kind, reason=reason)

    # ------------------------------------------------------------------ the old JSON index
    def _import_json_index(self) -> None:
        old = self.root / "registry.json"
        if not old.is_file() or self._rows("SELECT version FROM versions LIMIT 1"):
            return
        try:
            index = json.loads(old.read_text())
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{old}: registry index is not valid JSON ({exc})") from exc
        with self._write() as con:
            for v in index.get("versions", []):
                con.execute("INSERT OR IGNORE INTO versions (version, parent, created, info) VALUES (?, ?, ?, ?)",
                            (v["version"], v.get("parent"), v.get("created", time.time()),
                             json.dumps(v.get("info") or {})))
            if index.get("current") is not None:
                self._set_active(con, int(index["current"]))

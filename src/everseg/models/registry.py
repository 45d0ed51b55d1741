"""Model versions on disk: every published model is a numbered folder with its parent recorded.

Layout: ``<root>/versions/v0001/`` (an everseg model folder) ... and ``<root>/registry.json``
``{"current": 3, "versions": [{"version": 1, "parent": null, "created": ..., "info": {...}}, ...]}``.
The index is replaced atomically, so a crash leaves the previous state; rolling back only
moves ``current``, nothing is deleted.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from torch import nn

from everseg.atomic import atomic_write_json
from everseg.models.saving import load_model, save_model


class ModelRegistry:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index_path = self.root / "registry.json"
        if self._index_path.is_file():
            try:
                self._index = json.loads(self._index_path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self._index_path}: registry index is not valid JSON ({exc})") from exc
        else:
            self._index = {"current": None, "versions": []}

    def path(self, version: int) -> Path:
        return self.root / "versions" / f"v{version:04d}"

    @property
    def current(self) -> int | None:
        return self._index["current"]

    def versions(self) -> list[dict[str, Any]]:
        return list(self._index["versions"])

    def entry(self, version: int) -> dict[str, Any]:
        for v in self._index["versions"]:
            if v["version"] == version:
                return v
        raise KeyError(f"{self.root}: no model version {version}")

    def publish(self, model: nn.Module, *, parent: int | None = None, info: dict[str, Any] | None = None) -> int:
        """Save ``model`` as the next version and make it current."""
        with self._lock:
            version = max((v["version"] for v in self._index["versions"]), default=0) + 1
            model.metadata = {**(getattr(model, "metadata", None) or {}), "version": version, "parent_version": parent}
            save_model(model, self.path(version))
            self._index["versions"].append({"version": version, "parent": parent, "created": time.time(),
                                            "info": dict(info or {})})
            self._index["current"] = version
            atomic_write_json(self._index_path, self._index)
            return version

    def load(self, version: int | None = None) -> nn.Module:
        version = self.current if version is None else version
        if version is None:
            raise FileNotFoundError(f"{self.root}: the registry has no model yet")
        self.entry(version)
        return load_model(self.path(version))

    def rollback(self, version: int | None = None) -> int:
        """Make ``version`` (default: the current one's parent) current again."""
        with self._lock:
            if version is None:
                if self.current is None:
                    raise ValueError(f"{self.root}: nothing to roll back")
                version = self.entry(self.current)["parent"]
                if version is None:
                    raise ValueError(f"{self.root}: version {self.current} has no parent to roll back to")
            self.entry(version)
            self._index["current"] = version
            atomic_write_json(self._index_path, self._index)
            return version

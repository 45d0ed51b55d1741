"""``everseg serve`` as a function: prepare the registry and token, start the update worker
process, run the HTTP app under uvicorn."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from everseg.atomic import atomic_write
from everseg.models.versions import ModelRegistry
from everseg.serve.worker import WorkerSettings

log = logging.getLogger(__name__)
TOKEN_FILE = "token"


def read_or_create_token(registry: Path, token_file: str | Path | None = None) -> tuple[str, Path]:
    """The bearer token: from ``token_file``, else from ``<registry>/token``, made (random,
    readable by the owner only) when missing: secure by default."""
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise FileNotFoundError(f"--token-file {path}: no such file")
        token = path.read_text(encoding="utf-8").strip()
        if len(token) < 16:
            raise ValueError(f"--token-file {path}: the token must be at least 16 characters")
        return token, path
    path = registry / TOKEN_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8").strip(), path
    token = secrets.token_urlsafe(32)

    def write(p: Path) -> None:
        p.write_text(token + "\n", encoding="utf-8")
        os.chmod(p, 0o600)  # a secret: the owner's only, whatever the umask
    atomic_write(path, write)
    return token, path


def prepare_registry(registry: Path, model: str | Path | None) -> ModelRegistry:
    """Open the registry; publish ``model`` as version 1 when it is empty."""
    from everseg.workflows import load_trained_model, resolve_model_dir

    # A refused start changes nothing: a new registry folder is made only once the model is read.
    exists = any((registry / name).is_file() for name in ("registry.db", "registry.json"))
    reg = ModelRegistry(registry) if exists else None
    if reg is None or reg.current is None:
        if model is None:
            raise ValueError(f"--registry {registry} has no model yet: pass --model MODEL to publish one as "
                             "version 1")
        if Path(model).suffix.lower() == ".onnx":
            raise ValueError(f"--model {model}: the service trains the model it serves, so it takes an everseg model "
                             "folder; ONNX files run in eval and predict")
        source = resolve_model_dir(model).resolve()
        loaded = load_trained_model(source)
        reg = reg or ModelRegistry(registry)

        def with_memory(folder: Path) -> None:
            # The replay memory saved with the model (scenario run, learn) is what updates rehearse.
            if (source / "memory" / "memory.json").is_file():
                shutil.copytree(source / "memory", folder / "memory")
        version = reg.publish(loaded, info={"source": "initial", "path": str(source)},
                              save_extra=with_memory)
        log.info("published %s as version %d", source, version)
    elif model is not None:
        log.info("--registry %s has versions already (serving %d): --model is not published again",
                 registry, reg.current)
    return reg


class WorkerProcess:
    """The update worker as a child process, restarted (after a pause) if it dies."""

    def __init__(self, args: list[str]):
        self.args = args
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep_running, name="everseg-worker-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _keep_running(self) -> None:
        while not self._stop.is_set():
            self.proc = subprocess.Popen([sys.executable, "-m", "everseg.serve.worker", *self.args])
            code = self.proc.wait()
            if self._stop.is_set():
                return
            log.error("the update worker stopped (exit code %s); restarting it in 5 s", code)
            self._stop.wait(5)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_service(registry: str | Path, *, model: str | Path | None = None, holdout: str | Path | None = None,
                dataset: str | None = None, split: str = "val", host: str = "127.0.0.1", port: int = 8000,
                token_file: str | Path | None = None, worker: WorkerSettings | None = None,
                settings: dict[str, Any] | None = None) -> None:
    """Serve until interrupted (see ``everseg serve --help``)."""
    import uvicorn

    from everseg.serve.app import ServeSettings, create_app

    from everseg.devices import resolve_device

    root = Path(registry)
    # Everything the user gave is checked before the registry is touched: a refused start changes nothing.
    resolve_device((settings or {}).get("device", "auto"), option="--device")
    token, token_path = read_or_create_token(root, token_file) if token_file is not None else (None, None)
    extra: dict[str, Any] = {"learning": holdout is not None}
    if holdout is not None:
        from everseg.data import open_dataset

        checked = open_dataset(holdout, dataset=dataset, split=split)  # a bad holdout fails now, not in the worker
        extra["holdout_images"] = len(checked)
    reg = prepare_registry(root, model)
    if token is None:
        token, token_path = read_or_create_token(root)
    workers = None
    if holdout is not None:
        args = ["--registry", str(root), "--holdout", str(holdout), "--split", split,
                "--settings", json.dumps(asdict(worker or WorkerSettings()))]
        if dataset:
            args += ["--dataset", dataset]
        workers = WorkerProcess(args)
    else:
        log.warning("no --holdout: corrections are stored but not learned (a server with --holdout learns them)")
    app = create_app(ServeSettings(registry=root, token=token, extra=extra, **(settings or {})), registry=reg)
    log.info("serving version %d on http://%s:%d ; token for corrections and rollbacks: %s",
             reg.current, host, port, token_path)
    if workers is not None:
        workers.start()
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        uvicorn.Server(config).run()
    finally:
        if workers is not None:
            workers.stop()


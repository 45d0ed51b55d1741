"""The HTTP service: predictions from the active model version, corrections queued for the
update worker, versions listed, activated and rolled back, Prometheus metrics, the web page.

The app never trains: the update worker (:mod:`everseg.serve.worker`, its own process)
does, and publishes versions to the registry. The app follows the registry's active version
(:class:`ServedModel` looks every ``poll_seconds``), loading a new version beside the one
serving and swapping them in one assignment, so a prediction is never blocked by an update
and always names the version that made it.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from torch import nn

from everseg.devices import usable_cores
from everseg.models.saving import read_model_config
from everseg.models.versions import ModelRegistry, RegistryError
from everseg.serve.feedback import FeedbackStore, QueueFull
from everseg.serve.metrics import ServiceMetrics
from everseg.serve.uploads import UploadError, encode_png, read_image_upload, read_mask_upload

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeSettings:
    """How the service runs; ``everseg serve`` fills it from its options."""

    registry: Path  # the registry folder: versions, registry.db, feedback files
    token: str  # the bearer token mutating endpoints require
    max_upload_bytes: int = 20 * 2**20  # largest request body (413 above)
    max_pixels: int = 25_000_000  # largest image, read from its header before decoding (413 above)
    max_queued: int = 100  # feedback items waiting at most (429 above)
    poll_seconds: float = 0.1  # how often the active version is looked up (a SQLite read; adds half of it to an update)
    bf16: bool | None = None  # bfloat16 inference; None = where the device computes it natively
    device: str = "auto"  # where predictions run: auto (CUDA when present) | cpu | cuda | cuda:N | mps
    predict_workers: int | None = None  # predictions computed at once; None = default_predict_workers()
    extra: dict[str, Any] = field(default_factory=dict)  # shown on /healthz (holdout, worker)


def default_predict_workers(device: torch.device) -> int:
    """Two predictions at once on a CPU with two cores or more, one on an accelerator (a GPU
    runs one process's kernels in turn: a second worker gains nothing there)."""
    return 2 if device.type == "cpu" and usable_cores() >= 2 else 1


def inference_pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """``workers`` threads that predict, each with ``threads`` torch threads, set once: setting
    them per prediction costs more than it saves (two switches cost 30 ms of an 85-ms
    prediction on 2 cores, as oneDNN drops its cached kernels at each)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="everseg-predict",
                              initializer=_own_torch_threads, initargs=(threads,))


def _own_torch_threads(threads: int) -> None:
    # A thread's first torch call sets its threads to the process's last setting, which another
    # pool's thread may have changed: make that first call now, then set this thread's own.
    torch.get_num_threads()
    torch.set_num_threads(threads)


class PredictPool:
    """Where predictions run: a prediction alone gets every core, predictions that arrive
    while another runs share them, ``workers`` at once with ``cores // workers`` threads each.

    On the 2-core machine of benchmarks/serve.py a 360x480 prediction took 83 ms with two
    threads and 169 ms with one, yet two one-thread predictions side by side answered 4
    back-to-back clients about 1.5x as often as one two-thread prediction at a time (the HTTP
    work of one request overlaps the other's prediction), and a lone request kept its speed.
    Each pool thread's torch threads are set once (see :func:`inference_pool`), so no more
    threads compute than there are cores, except while a burst begins beside a lone prediction."""

    def __init__(self, workers: int, cores: int):
        self.workers, self.threads = workers, max(1, cores // workers)
        self._alone = inference_pool(1, cores)
        self._shared = inference_pool(workers, self.threads) if workers > 1 else None
        self._running = 0  # touched only on the event loop's thread

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        pool = self._alone if self._shared is None or self._running == 0 else self._shared
        self._running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        finally:
            self._running -= 1

    def shutdown(self) -> None:
        for pool in (self._alone, self._shared):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


class LimitAndTime:
    """ASGI middleware: a request whose Content-Length is over ``max_bytes`` gets 413 before its
    body is read; every request's latency (to its last byte sent) goes to ``observe``.

    Plain ASGI, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware passes each
    response through an extra task and stream, which cost 0.9 ms a request on the 2-core
    machine of benchmarks/serve.py (a predict's HTTP overhead is about 15 ms in all)."""

    def __init__(self, app: Callable[..., Any], max_bytes: int, observe: Callable[[str, str, int, float], None]):
        self.app, self.max_bytes, self.observe = app, max_bytes, observe

    async def __call__(self, scope: dict, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            too_big = JSONResponse({"detail": f"request body of {int(length):,} bytes is over the limit of "
                                              f"{self.max_bytes:,}"}, status_code=413)
            await too_big(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # an exception that escapes is answered 500 outside

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.observe(endpoint, scope["method"], status, time.perf_counter() - start)


class ServedModel:
    """The active version's model, kept in step with the registry by a background thread."""

    def __init__(self, registry: ModelRegistry, poll_seconds: float = 0.1, device: str = "auto"):
        from everseg.devices import resolve_device

        self.registry = registry
        self.poll_seconds = poll_seconds
        self.device = resolve_device(device, option="--device")
        self._lock = threading.Lock()
        version = registry.current
        if version is None:
            raise RegistryError(f"{registry.root}: the registry has no model yet; pass --model to publish one")
        self._served: tuple[int, nn.Module] = (version, self._prepare(registry.load(version, self.device)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.load_errors = 0

    @staticmethod
    def _prepare(model: nn.Module) -> nn.Module:
        return model.eval().to(memory_format=torch.channels_last)

    def get(self) -> tuple[int, nn.Module]:
        with self._lock:
            return self._served

    def refresh(self) -> bool:
        """Load the active version if it changed; True when it did. A version that fails to
        load leaves the current one serving (and is retried at the next look)."""
        version = self.registry.current
        if version is None or version == self._served[0]:
            return False
        try:
            model = self._prepare(self.registry.load(version, self.device))
        except Exception as exc:  # a broken folder must not take the service down
            self.load_errors += 1
            log.error("cannot load version %s, still serving %s: %s", version, self._served[0], exc)
            return False
        with self._lock:
            self._served = (version, model)
        log.info("serving version %d", version)
        return True

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.poll_seconds):
                self.refresh()
        self._thread = threading.Thread(target=loop, name="everseg-follow-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def predict_response(model: nn.Module, version: int, rgb: np.ndarray, bf16: bool) -> dict[str, Any]:
    """The JSON of ``POST /v1/predict`` (plus the class ids, for the other formats)."""
    from everseg.evaluate import predict_image

    start = time.perf_counter()
    ids, conf = predict_image(model, rgb, autocast_bf16=bf16, channels_last=True)
    seconds = time.perf_counter() - start
    ls = model.label_space
    # In torch: its half-to-float mean and bincount took 0.03 and 0.18 ms here, numpy's 0.52 and 0.31.
    counts = torch.bincount(torch.from_numpy(ids).ravel(), minlength=ls.num_classes)[:ls.num_classes].tolist()
    shares = [c / ids.size for c in counts]
    areas = {ls.names[c]: shares[c] for c in range(ls.num_classes) if counts[c]}
    return {"version": version, "classes": list(ls.names), "colors": [list(c) for c in ls.palette],
            "areas": areas, "confidence": float(torch.from_numpy(conf).mean(dtype=torch.float32)),
            "seconds": seconds, "height": int(ids.shape[0]), "width": int(ids.shape[1]), "_ids": ids,
            "_shares": shares}


def create_app(settings: ServeSettings, *, served: ServedModel | None = None,
               store: FeedbackStore | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """The FastAPI app. ``served`` / ``store`` / ``registry`` default to new ones on
    ``settings.registry``; the app starts following the registry when it starts up."""
    from everseg.devices import choose_precision

    registry = registry or ModelRegistry(settings.registry)
    served = served or ServedModel(registry, settings.poll_seconds, settings.device)
    store = store or FeedbackStore(settings.registry, max_queued=settings.max_queued)
    metrics = ServiceMetrics(registry, store)
    bf16 = choose_precision(served.device).dtype == torch.bfloat16 if settings.bf16 is None else settings.bf16
    inference = PredictPool(settings.predict_workers or default_predict_workers(served.device), usable_cores())

    @asynccontextmanager
    async def lifespan(app):  # noqa: ARG001 - FastAPI's signature
        served.start()
        yield
        served.stop()
        inference.shutdown()

    app = FastAPI(title="everseg", version="1", lifespan=lifespan,
                  description="Predictions, corrections that teach the model, versions with rollback.")
    app.state.served, app.state.store, app.state.registry, app.state.metrics = served, store, registry, metrics

    app.add_middleware(LimitAndTime, max_bytes=settings.max_upload_bytes,
                       observe=lambda endpoint, method, code, seconds: metrics.observe_request(
                           endpoint, method, code, seconds, served.get()[0]))

    def authorized(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.token.encode()):
            raise HTTPException(401, "this endpoint needs 'Authorization: Bearer TOKEN' (the token file "
                                      "`everseg serve` printed when it started)",
                                 headers={"WWW-Authenticate": "Bearer"})

    async def read_upload(upload: UploadFile, what: str) -> bytes:
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise UploadError(413, f"{what} is over the upload limit of {settings.max_upload_bytes:,} bytes")
        return data

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError):  # noqa: ARG001
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": served.get()[0], "predict_workers": inference.workers,
                "predict_threads": inference.threads,
                **settings.extra}

    @app.post("/v1/predict")
    async def predict(image: UploadFile = File(..., description="PNG or JPEG"),
                      format: str = Query("json", pattern="^(json|png|overlay)$",
                                          description="json, png (class ids) or overlay"),
                      include: str = Query("", pattern="^(mask)?$",
                                           description="json only: 'mask' adds mask_png, the class ids as a "
                                                       "base64 grayscale PNG")):
        rgb, _ = read_image_upload(await read_upload(image, "image"), max_pixels=settings.max_pixels)
        version, model = served.get()

        out = await inference.run(predict_response, model, version, rgb, bf16)
        ids, shares = out.pop("_ids"), out.pop("_shares")
        metrics.observe_prediction(version, out["confidence"], model.label_space.names, shares)
        headers = {"X-Everseg-Version": str(version)}
        if format == "png":
            return Response(encode_png(ids, list(model.label_space.palette)), media_type="image/png",
                            headers=headers)
        if format == "overlay":
            from PIL import Image

            from everseg.evaluate import overlay, with_legend

            buf = io.BytesIO()
            Image.fromarray(with_legend(overlay(rgb, ids, model.label_space), ids, model.label_space)).save(
                buf, format="PNG")
            return Response(buf.getvalue(), media_type="image/png", headers=headers)
        if include == "mask":
            out["mask_png"] = base64.b64encode(encode_png(ids)).decode("ascii")
        return JSONResponse(out, headers=headers)

    @app.post("/v1/feedback", status_code=202, dependencies=[Depends(authorized)])
    async def feedback(image: UploadFile = File(..., description="PNG or JPEG"),
                       mask: UploadFile = File(..., description="PNG of class ids, 255 = unlabelled"),
                       new_classes: str = Form("", description="comma-separated names of new classes"),
                       served_version: int | None = Form(None, description="the version whose prediction was "
                                                         "corrected (default: the one serving now)")):
        image_bytes = await read_upload(image, "image")
        mask_bytes = await read_upload(mask, "mask")
        rgb, suffix = read_image_upload(image_bytes, max_pixels=settings.max_pixels)
        names = [n.strip() for n in new_classes.split(",")] if new_classes.strip() else []
        version, model = served.get()
        if served_version is not None:
            try:
                registry.entry(served_version)
            except RegistryError as exc:
                raise UploadError(400, f"served_version: {exc}") from None
            version = served_version
        # The mask's ids are those of the classes the client was shown: the served version's.
        known = (list(model.label_space.names) if version == served.get()[0]
                 else list(read_model_config(registry.path(version))["label_space"]["names"]))
        if any(not n for n in names) or len(set(names)) != len(names):
            raise UploadError(400, f"new_classes {new_classes!r}: empty or repeated names")
        clash = [n for n in names if n in known]
        if clash:
            raise UploadError(400, f"new_classes {clash} are classes the model already has")
        if len(known) + len(names) > 255:
            raise UploadError(400, "at most 255 classes")
        read_mask_upload(mask_bytes, height=rgb.shape[0], width=rgb.shape[1], num_classes=len(known) + len(names),
                         ignore_index=255, max_pixels=settings.max_pixels)
        try:
            item = store.add(image_bytes, suffix, mask_bytes, height=rgb.shape[0], width=rgb.shape[1],
                             new_classes=names, label_names=known + names, served_version=version)
        except QueueFull as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": "10"}) from None
        return {"id": item.id, "status": item.status}

    @app.get("/v1/feedback/{item_id}")
    def feedback_status(item_id: int) -> dict[str, Any]:
        try:
            return store.get(item_id).public()
        except KeyError:
            raise HTTPException(404, f"no feedback item {item_id}") from None

    @app.get("/v1/models")
    def models() -> list[dict[str, Any]]:
        return [model_summary(v, store) for v in registry.versions()]

    @app.post("/v1/models/{version}/activate", dependencies=[Depends(authorized)])
    def activate(version: int) -> dict[str, Any]:
        try:
            registry.activate(version, reason="activated through the API")
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None
        served.refresh()
        return {"active": served.get()[0]}

    @app.post("/v1/models/rollback", dependencies=[Depends(authorized)])
    def rollback() -> dict[str, Any]:
        try:
            version = registry.rollback(reason="rolled back through the API")
        except RegistryError as exc:
            raise HTTPException(409, str(exc)) from None
        served.refresh()
        return {"active": served.get()[0], "rolled_back_to": version}

    @app.get("/metrics")
    def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def model_summary(entry: dict[str, Any], store: FeedbackStore, window: int = 50) -> dict[str, Any]:
    """One version as ``GET /v1/models`` lists it."""
    info = entry["info"]
    scores = store.feedback_mious(entry["version"], window)
    return {"version": entry["version"], "parent": entry["parent"], "created": entry["created"],
            "status": entry["status"], "reason": entry["reason"], "active": entry["active"],
            "holdout_miou": info.get("holdout_miou"),
            "feedback_miou": sum(scores) / len(scores) if scores else None, "feedback_scored": len(scores),
            "produced_by": info.get("source", "unknown"), "feedback_ids": info.get("feedback_ids", []),
            "classes": info.get("classes")}

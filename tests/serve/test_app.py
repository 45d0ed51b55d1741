"""The HTTP contract of `everseg serve`, in process (FastAPI's test client, no worker)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from everseg.data.labelspace import LabelSpace
from everseg.models import create_model
from everseg.models.versions import ModelRegistry
from everseg.serve.app import ServeSettings, create_app, PredictPool, default_predict_workers, usable_cores

TOKEN = "t" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NAMES = ("Sky", "Road", "Car")


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def service(tmp_path):
    from fastapi.testclient import TestClient

    reg = ModelRegistry(tmp_path / "reg")
    model = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=LabelSpace(names=NAMES), pretrained=False)
    model.metadata["class_fractions"] = {"Sky": 0.3, "Road": 0.6, "Car": 0.1}
    reg.publish(model, info={"source": "initial", "holdout_miou": 40.0})
    settings = ServeSettings(registry=tmp_path / "reg", token=TOKEN, max_upload_bytes=200_000, max_pixels=120_000,
                             max_queued=2, poll_seconds=0.05, bf16=False, predict_workers=2)
    with TestClient(create_app(settings, registry=reg)) as client:
        client.reg, client.model = reg, model
        yield client


@pytest.fixture
def street() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)


def test_health_predict_and_its_formats(service, street):
    assert service.get("/healthz").json() == {"status": "ok", "version": 1, "predict_workers": 2,
                                              "predict_threads": max(1, usable_cores() // 2)}
    r = service.post("/v1/predict", files={"image": ("x.png", png(street), "image/png")})
    assert r.status_code == 200 and r.headers["x-everseg-version"] == "1"
    body = r.json()
    assert body["version"] == 1 and body["classes"] == list(NAMES)
    assert sum(body["areas"].values()) == pytest.approx(1.0) and set(body["areas"]) <= set(NAMES)
    assert 0 < body["confidence"] <= 1 and body["seconds"] > 0 and (body["height"], body["width"]) == (48, 64)
    r = service.post("/v1/predict?format=png", files={"image": ("x.jpg", png(street, "JPEG"), "image/jpeg")})
    ids = np.array(Image.open(io.BytesIO(r.content)))
    assert r.status_code == 200 and ids.shape == (48, 64) and ids.max() < 3
    r = service.post("/v1/predict?format=overlay", files={"image": ("x.png", png(street), "image/png")})
    overlay = np.array(Image.open(io.BytesIO(r.content)))
    assert overlay.shape[0] >= 48 and overlay.shape[1] > 64  # the legend on the right (taller if it needs)
    r = service.post("/v1/predict?include=mask", files={"image": ("x.png", png(street), "image/png")})
    import base64

    embedded = np.array(Image.open(io.BytesIO(base64.b64decode(r.json()["mask_png"]))))
    assert embedded.shape == (48, 64)


@pytest.mark.parametrize("files, status, words", [
    ({"image": ("x.txt", b"hello", "text/plain")}, 400, "not a PNG or JPEG"),
    ({"image": ("x.png", b"", "image/png")}, 400, "empty"),
    ({"image": ("x.png", png(np.zeros((400, 400, 3), np.uint8)), "image/png")}, 413, "limit"),
    ({"image": ("x.png", b"\x89PNG" + b"0" * 300_000, "image/png")}, 413, "over the limit"),
])
def test_bad_images_get_clear_4xx(service, files, status, words):
    r = service.post("/v1/predict", files=files)
    assert r.status_code == status and words in r.json()["detail"], r.text


def test_feedback_needs_the_token_and_a_fitting_mask(service, street):
    mask = np.zeros((48, 64), np.uint8)
    mask[:10] = 1
    files = {"image": ("x.png", png(street), "image/png"), "mask": ("m.png", png(mask), "image/png")}
    assert service.post("/v1/feedback", files=files).status_code == 401
    assert service.post("/v1/feedback", files=files, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = service.post("/v1/feedback", files=files, headers=AUTH)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    item = service.get(f"/v1/feedback/{r.json()['id']}").json()
    assert item["status"] == "queued" and item["served_version"] == 1
    bad = [({"mask": ("m.png", png(mask[:40]), "image/png")}, {}, "is 64x40 but the image is 64x48"),
           ({"mask": ("m.png", png(np.full((48, 64), 7, np.uint8)), "image/png")}, {}, "outside the label space"),
           ({}, {"new_classes": "Sky"}, "already has"),
           ({}, {"new_classes": "A,,B"}, "empty or repeated")]
    for change, data, words in bad:
        r = service.post("/v1/feedback", files={**files, **change}, data=data, headers=AUTH)
        assert r.status_code == 400 and words in r.json()["detail"], r.text
    # A new class: its id follows the served classes.
    mask[-5:] = 3
    r = service.post("/v1/feedback", files={**files, "mask": ("m.png", png(mask), "image/png")},
                     data={"new_classes": "Bollard"}, headers=AUTH)
    assert r.status_code == 202
    assert service.get(f"/v1/feedback/{r.json()['id']}").json()["new_classes"] == ["Bollard"]
    r = service.post("/v1/feedback", files=files, headers=AUTH)
    assert r.status_code == 429 and "full" in r.json()["detail"]  # max_queued = 2
    assert service.get("/v1/feedback/999").status_code == 404


def test_versions_activate_and_rollback_are_followed_at_once(service):
    reg = service.reg
    reg.publish(service.model, parent=1, info={"source": "feedback", "holdout_miou": 41.0})
    deadline = time.time() + 2
    while service.get("/healthz").json()["version"] != 2 and time.time() < deadline:
        time.sleep(0.05)
    assert service.get("/healthz").json()["version"] == 2  # published by another process: followed
    listed = service.get("/v1/models").json()
    assert [(v["version"], v["parent"], v["active"], v["holdout_miou"]) for v in listed] == \
        [(1, None, False, 40.0), (2, 1, True, 41.0)]
    assert service.post("/v1/models/rollback").status_code == 401
    r = service.post("/v1/models/rollback", headers=AUTH)
    assert r.json() == {"active": 1, "rolled_back_to": 1}
    assert service.post("/v1/models/rollback", headers=AUTH).status_code == 409  # version 1 has no parent
    assert service.post("/v1/models/2/activate", headers=AUTH).json() == {"active": 2}
    assert service.post("/v1/models/7/activate", headers=AUTH).status_code == 404


def test_metrics_are_prometheus_histograms_labelled_by_version(service, street):
    service.post("/v1/predict", files={"image": ("x.png", png(street), "image/png")})
    text = service.get("/metrics").text
    assert 'everseg_request_seconds_bucket{code="200",endpoint="/v1/predict",le="0.1",method="POST",version="1"}' in text
    assert 'everseg_prediction_confidence_count{version="1"} 1.0' in text
    assert 'everseg_predicted_class_fraction_bucket{class="Road",' in text
    assert 'everseg_training_class_fraction{class="Road"} 0.6' in text
    assert "everseg_active_version 1.0" in text
    assert 'everseg_holdout_miou{status="published",version="1"} 40.0' in text
    assert 'everseg_feedback_items{status="queued"} 0.0' in text
    assert "everseg_update_seconds_bucket" in text


def test_the_page_and_the_openapi_contract_are_served(service):
    page = service.get("/")
    assert page.status_code == 200 and "everseg" in page.text and "/static/app.js" in page.text
    assert service.get("/static/app.js").status_code == 200
    paths = service.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/v1/predict", "/v1/feedback", "/v1/feedback/{item_id}", "/v1/models",
            "/v1/models/{version}/activate", "/v1/models/rollback", "/metrics"} <= set(paths)


def test_a_prediction_alone_gets_every_core_and_a_burst_shares_them():
    import asyncio
    import threading

    import torch

    before = torch.get_num_threads()
    pool = PredictPool(2, cores=2)
    release = threading.Event()
    together = threading.Barrier(2, timeout=20)  # broken, and raising, unless both run at once

    def first() -> int:
        release.wait(20)
        return torch.get_num_threads()

    def beside() -> int:
        together.wait()
        return torch.get_num_threads()

    async def burst():
        alone = asyncio.create_task(pool.run(first))
        await asyncio.sleep(0)  # the first is running: the next two arrive beside it
        shared = await asyncio.gather(pool.run(beside), pool.run(beside))
        release.set()
        return await alone, shared

    try:
        assert asyncio.run(burst()) == (2, [1, 1])
        assert asyncio.run(pool.run(torch.get_num_threads)) == 2  # alone again: every core
    finally:
        pool.shutdown()
        torch.set_num_threads(before)  # a pool thread's setting is the default of threads started later


def test_two_predict_workers_on_a_cpu_with_two_cores_one_elsewhere(monkeypatch):
    import torch

    from everseg.serve import app as service_app

    monkeypatch.setattr(service_app, "usable_cores", lambda: 1)
    assert default_predict_workers(torch.device("cpu")) == 1
    monkeypatch.setattr(service_app, "usable_cores", lambda: 2)
    assert default_predict_workers(torch.device("cpu")) == 2
    assert default_predict_workers(torch.device("cuda")) == 1

"""A real Prometheus scrapes a real `everseg serve`; the shipped config is valid."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from serve_testkit import free_port

ROOT = Path(__file__).resolve().parents[2]
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="needs Prometheus: apt-get install prometheus (.ci/run installs it)")


@needs_prometheus
def test_the_shipped_prometheus_config_is_valid():
    done = subprocess.run(["promtool", "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_grafana_dashboard_queries_metrics_the_service_exports():
    import json

    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in ("everseg_request_seconds_bucket", "everseg_prediction_confidence_bucket",
                 "everseg_predicted_class_fraction_sum", "everseg_training_class_fraction", "everseg_feedback_items",
                 "everseg_holdout_miou", "everseg_feedback_miou", "everseg_active_version",
                 "everseg_update_seconds_bucket", "everseg_version_changes_total"):
        assert name in exprs, name


@needs_prometheus
def test_prometheus_reads_everseg_metrics_back(start_server, tmp_path, tiny_camvid):
    from everseg.models import create_model, save_model
    from everseg.data import open_dataset

    labels = open_dataset(tiny_camvid, dataset="folder", split="test").label_space
    save_model(create_model(arch="lraspp", backbone="mobilenet_v2", label_space=labels, pretrained=False),
               tmp_path / "model")
    server = start_server(tmp_path / "registry", "--model", str(tmp_path / "model"))
    image = next((tiny_camvid / "images").glob("*.png")).read_bytes()
    r = httpx.post(server.url + "/v1/predict", files={"image": ("x.png", image, "image/png")}, timeout=60)
    assert r.status_code == 200

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: everseg\n"
                      f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = 'everseg_request_seconds_count{endpoint="/v1/predict",code="200"}'
        deadline, found = time.time() + 60, []
        while time.time() < deadline and not found:
            time.sleep(1)
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5).json()
            except httpx.HTTPError:
                continue
            found = answer.get("data", {}).get("result", [])
        assert found, "Prometheus never returned the predict latency histogram"
        assert found[0]["metric"]["version"] == "1" and float(found[0]["value"][1]) >= 1
        answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "everseg_active_version"},
                           timeout=5).json()
        assert float(answer["data"]["result"][0]["value"][1]) == 1
    finally:
        prom.terminate()
        prom.wait(20)

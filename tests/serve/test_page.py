"""The web page in a real headless Chromium against a real server:
load -> predict -> paint -> send -> a new version appears."""

from __future__ import annotations

import shutil

import pytest

from everseg.data import open_dataset
from everseg.models import create_model, save_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium: apt-get install chromium (.ci/run installs it)")]
# Chromium as root in a container, with no network: the flags that keep it from phoning home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def test_predict_paint_send_and_see_the_new_version(start_server, tiny_camvid, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    labels = open_dataset(tiny_camvid, dataset="folder", split="test").label_space
    save_model(create_model(arch="lraspp", backbone="mobilenet_v2", label_space=labels, pretrained=False),
               tmp_path / "model")
    server = start_server(tmp_path / "registry", "--model", str(tmp_path / "model"), "--holdout", str(tiny_camvid),
                          "--split", "test", "--tolerance", "100")
    image = sorted((tiny_camvid / "images").glob("*.png"))[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        expect(page.locator("#active-version")).to_have_text("1")
        page.fill("#token", server.token)
        page.dispatch_event("#token", "change")
        page.set_input_files("#file", str(image))
        expect(page.locator("#prediction")).to_be_visible()
        expect(page.locator("#legend li").first).to_be_visible()
        assert "version 1" in page.inner_text("#pred-info")
        # Pick Road and paint a stroke across the picture.
        page.locator("#classes li", has_text="Road").click()
        box = page.locator("#labels").bounding_box()
        page.mouse.move(box["x"] + 5, box["y"] + box["height"] * 0.8)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] - 5, box["y"] + box["height"] * 0.8, steps=10)
        page.mouse.up()
        painted = page.evaluate("() => Array.from(state.labels).filter((v) => v === 3).length")
        assert painted > 0
        # A new class, painted too.
        page.fill("#new-class-name", "Bollard")
        page.click("#new-class button")
        expect(page.locator("#classes li", has_text="Bollard (new)")).to_have_class("picked")
        page.mouse.move(box["x"] + 10, box["y"] + 10)
        page.mouse.down()
        page.mouse.move(box["x"] + 20, box["y"] + 20, steps=3)
        page.mouse.up()
        page.click("#send")
        # One correction with a new class waits for more examples (3 by default); without it,
        # the next one is learned. Send the same picture without the new class.
        expect(page.locator("#feedback-status")).to_contain_text("queued", timeout=30_000)
        page.evaluate("() => { state.classes = state.classes.filter((c) => !c.isNew); "
                      "state.labels = state.labels.map((v) => v >= state.classes.length && v !== 255 ? 255 : v); }")
        page.click("#send")
        expect(page.locator("#feedback-status")).to_have_attribute("data-status", "accepted", timeout=180_000)
        expect(page.locator("#version-rows tr.active td").first).to_have_text("2", timeout=10_000)
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert not errors, errors

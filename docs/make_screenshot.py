"""docs/serve-page.png: the `everseg serve` page in headless Chromium, with the `everseg demo`
model on a CamVid test image, after a correction was sent and judged by the guardrail.

    .venv/bin/python docs/make_screenshot.py

The correction is the image's ground truth (loaded into the page's label layer, as if painted)
plus one brush stroke of Road along the bottom, made with the mouse. Needs Debian's chromium and the
CamVid copy in ../shared/data; trains the demo model first if benchmarks/serve.py has not.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))

from serve import RUNS, SHARED_DATA, Server, demo_model, write_folder  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def main() -> None:
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    from everseg.data import open_dataset

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("make_screenshot: needs chromium (apt-get install chromium)")
    model = demo_model()
    data = SHARED_DATA / "camvid"
    val = open_dataset(data, dataset="camvid", split="val")
    holdout = write_folder(RUNS / "holdout", val, list(range(0, len(val), 5))[:20], "val")
    test = open_dataset(data, dataset="camvid", split="test")
    index = next(i for i, s in enumerate(test.samples) if s.stem == "Seq05VD_f00930")
    image, mask = test.decoded(index)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Image.fromarray(image).save(tmp / "street.png")
        server = Server(tmp / "registry", "--model", str(model), "--holdout", str(holdout), "--split", "val",
                        log=tmp / "serve.log")
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(server.url + "/")
                page.fill("#token", server.token)
                page.dispatch_event("#token", "change")
                page.set_input_files("#file", str(tmp / "street.png"))
                expect(page.locator("#legend li").first).to_be_visible()
                page.evaluate("(truth) => { state.labels = Uint8Array.from(truth); draw(); }", mask.ravel().tolist())
                page.locator("#classes li", has_text="Road").click()
                box = page.locator("#labels").bounding_box()
                page.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.95)
                page.mouse.down()
                page.mouse.move(box["x"] + box["width"] * 0.65, box["y"] + box["height"] * 0.95, steps=8)
                page.mouse.up()
                page.click("#send")
                status = page.locator("#feedback-status")
                expect(status).to_have_attribute("data-status", re.compile("accepted|rejected"), timeout=300_000)
                if status.get_attribute("data-status") == "accepted":
                    expect(page.locator("#version-rows tr.active td").first).to_have_text("2", timeout=30_000)
                page.screenshot(path=str(HERE / "serve-page.png"), full_page=True)
                browser.close()
        finally:
            server.stop()
    print(HERE / "serve-page.png")


if __name__ == "__main__":
    main()

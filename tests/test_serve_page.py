"""The demo page at ``/`` in a real browser: headless Chromium (Debian's package, which ``.ci/run``
installs) driven by Playwright. It uploads a file, shows the labels the API gives, and clicking a
point shows an attention map; /docs renders with nothing fetched from outside the server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api")
import httpx  # noqa: E402

from conftest import wait_for  # noqa: E402
from test_serve import _free_port, _ready  # noqa: E402

BROWSER = os.environ.get("HYBRIDVIT_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no Chromium: apt-get install chromium (or set HYBRIDVIT_BROWSER)")
def test_the_demo_page_labels_an_upload_and_shows_attention(tmp_path, digits_run):
    from hybridvit.data.datasets import digits_split

    images, _, _, val = digits_split()
    picture = tmp_path / "digit.png"
    Image.fromarray((images[val[3]] * (255 / 16)).astype(np.uint8)).resize((96, 96), Image.BICUBIC).convert(
        "RGB").save(picture)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "hybridvit", "serve", str(digits_run / "model"), "--port", str(port),
                             "--precision", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _ready(url), proc)
        answer = httpx.post(url + "/v1/predict?top_k=5", content=picture.read_bytes(),
                            headers={"content-type": "image/png"}, timeout=60).json()["predictions"][0]["top"]
        maps = httpx.post(url + "/v1/attention?y=16&x=16", content=picture.read_bytes(),
                          headers={"content-type": "image/png"}, timeout=60).json()
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=BROWSER, headless=True)
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('about').textContent.includes('levit_128s')")
            page.set_input_files("#file", str(picture))
            page.wait_for_selector(".bar .label")
            labels = page.locator(".bar .label").all_text_contents()
            values = page.locator(".bar .value").all_text_contents()
            page.locator("#image").click(position={"x": 168, "y": 168})  # the centre of the 336-pixel canvas
            page.wait_for_selector("#attention:not([hidden])")
            layer = page.locator("#attention").get_attribute("data-layer")
            info = page.locator("#attention-info").text_content()
            drawn = page.evaluate("""() => {
                const c = document.getElementById('attention');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let lit = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] > 0) lit++;
                return [c.width, c.height, lit];
            }""")
            page.screenshot(path=str(tmp_path / "demo.png"))
            # /docs with the internet cut off: Swagger UI must come from the server itself
            docs, outside = browser.new_page(), []
            docs.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                       else (outside.append(route.request.url), route.abort()))
            docs.goto(url + "/docs")
            docs.wait_for_function("document.querySelectorAll('.opblock-summary-path').length >= 3")
            operations = docs.locator(".opblock-summary-path").all_text_contents()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=600)
    assert outside == [] and {"/v1/predict", "/v1/attention", "/v1/model"} <= {o.strip() for o in operations}
    assert labels == [c["class"] for c in answer]
    assert values == [f"{100 * c['probability']:.1f}%" for c in answer]
    assert layer == str(maps["layer"]) and f"of {maps['layers']}" in info
    assert drawn[:2] == [32, 32] and drawn[2] > 0  # a map drawn over the whole input
    with Image.open(tmp_path / "demo.png") as shot:
        assert shot.size == (1000, 700)
        assert len(shot.convert("RGB").getcolors(2**20) or []) > 50  # the page, its image and map drawn

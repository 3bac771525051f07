"""The web page in headless Chromium: upload, overlay and score appear, the slider re-labels, screenshot kept.

Uses Debian's chromium (``/usr/bin/chromium``, or ``ANOMAP_CHROMIUM``) through Playwright's
``executable_path``; no browser is downloaded. The screenshot goes to ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

CHROMIUM = os.environ.get("ANOMAP_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set ANOMAP_CHROMIUM)",
                allow_module_level=True)
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
expect.set_options(timeout=20_000)

import anomap
from anomap.runtime.backend import load_backend
from anomap.serve.app import create_app
from conftest import TINY, make_category

ARTIFACTS = Path(__file__).parent / "artifacts"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def served(tmp_path_factory, monkeypatch_module):
    """A real uvicorn server on a free loopback port, serving a tiny trained ssl_ae (one torch thread)."""
    root = make_category(tmp_path_factory.mktemp("browser") / "cat")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = root.parent / "model.safetensors"
    anomap.create("ssl_ae", **TINY).fit(root, out=model, progress=False)
    backend = load_backend(model)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    feedback = root.parent / "feedback"
    server = uvicorn.Server(uvicorn.Config(create_app(backend, api_key="", feedback_dir=feedback), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start within 20 s"
    yield f"http://127.0.0.1:{port}/", root, backend, feedback
    server.should_exit = True
    thread.join(10)
    sock.close()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.delenv("ANOMAP_API_KEY", raising=False)
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, timeout=TIMEOUT_MS)
        try:
            pg = browser.new_page(viewport={"width": 1100, "height": 760})
            pg.set_default_timeout(TIMEOUT_MS)
            yield pg
        finally:
            browser.close()


def test_page_upload_overlay_score_and_slider(served, page, tmp_path):
    url, root, backend, _ = served
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(url)
    # Auto-waiting assertions, not wait_for_function: the page's CSP forbids the eval that the latter uses.
    expect(page.locator("#model")).to_contain_text("ssl_ae")

    image = root / "test" / "spot" / "000.png"
    page.set_input_files("#file", str(image))
    view = page.locator(".card img.view")
    expect(view).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    expect(view).to_have_js_property("naturalWidth", 48)  # the overlay decoded at the image's own size
    (want, _), = backend.predict_images([anomap.data.images.load_image(image)])
    shown = float(page.inner_text(".card .score"))
    assert shown == pytest.approx(want, rel=2e-3)
    thr = backend.calibration.threshold
    verdict = page.locator(".card .verdict")
    expect(verdict).to_have_text("ANOMALOUS" if want > thr else "normal")

    slider = page.locator("#threshold")
    slider.focus()
    page.keyboard.press("End")  # threshold above every score: nothing is anomalous
    expect(verdict).to_have_text("normal")
    page.keyboard.press("Home")  # below every score: everything is
    expect(verdict).to_have_text("ANOMALOUS")
    assert float(page.inner_text("#threshold-value")) < want
    page.click("#reset")
    expect(verdict).to_have_text("ANOMALOUS" if want > thr else "normal")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5_000

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is text, not an image")
    page.set_input_files("#file", str(bad))
    expect(page.locator("#error")).to_contain_text("Error 415")
    assert "notes.png" in page.inner_text("#error")
    assert not errors, errors


def test_feedback_buttons_store_the_verdicts(served, page):
    from anomap.feedback import FeedbackStore

    url, root, _, feedback = served
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    expect(page.locator("#model")).to_contain_text("ssl_ae")
    images = [root / "test" / "good" / "000.png", root / "test" / "spot" / "001.png"]
    page.set_input_files("#file", [str(p) for p in images])
    cards = page.locator(".card")
    expect(cards).to_have_count(2)
    cards.nth(0).locator(".mark-ok").click()
    expect(cards.nth(0).locator(".feedback-status")).to_have_text("saved as OK")
    cards.nth(1).locator(".mark-defect").click()
    expect(cards.nth(1).locator(".feedback-status")).to_have_text("saved as defect")
    records = {r.label: r.verdict for r in FeedbackStore(feedback).records()}
    assert records == {"000.png": "normal", "001.png": "anomalous"}
    assert not errors, errors


def test_api_docs_render_offline(served, page):
    url, _, _, _ = served
    outside: list[str] = []
    page.on("request", lambda req: outside.append(req.url) if not req.url.startswith(url) else None)
    page.goto(url + "docs")
    page.get_by_text("/v1/predict").first.wait_for()
    assert not outside, f"the docs page fetched from outside the server: {outside}"

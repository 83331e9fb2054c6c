"""The status page in a real browser: Debian's headless Chromium, driven by Playwright, against the real
screening loop (replay) served by waitress on a free localhost port.

Checks what a technician relies on: a verdict with score bars appears, the slide tally appears and then
grows without a reload (live events), the page's own buttons work with the token, the page raises no
script or CSP errors, and a screenshot is saved to ``build/screenshots/`` for people to look at.

Chromium is a system package that ``make test`` installs (``tools/preflight.sh``: apt, or the command to
run). A missing browser is a failure, not a skip, so CI cannot silently stop checking the page; set
``LEUKO_NO_BROWSER=1`` to skip on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from device import config as config_mod
from device.app import build
from device.classifier import Classifier
from device.sources import ReplaySource
from device.web import serve
from device.web.server import WebServer
from tests.device.conftest import ROOT, SAMPLES, wait_until

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "build" / "screenshots"
TOKEN = "browser-test-token"
WAIT_MS = 60_000  # a safety net for slow CI machines, never what is being tested


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("LEUKO_NO_BROWSER") == "1":
        pytest.skip("LEUKO_NO_BROWSER=1: the browser test of the status page was skipped on request")
    if not CHROMIUM.exists():
        pytest.fail(f"Debian's Chromium is not installed ({CHROMIUM} is missing), so the status page cannot be "
                    "checked in a browser. Run `make test` (it installs it where it may) or "
                    "`sudo apt-get install -y chromium`; "
                    "set LEUKO_NO_BROWSER=1 to skip this test on purpose.", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing; run `make install`", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory, decisive_classifier: Classifier) -> Iterator[tuple]:
    """The real loop replaying the samples (a new field about every 0.4 s) and the page on a free port."""
    state = tmp_path_factory.mktemp("browser-state")
    cfg = config_mod.parse({
        "model": {"threads": 1, "use_edgetpu": False},
        "camera": {"source": "replay", "replay_dir": str(SAMPLES), "interval_ms": 400, "read_timeout_s": 5.0},
        "trigger": {"mode": "continuous", "interval_ms": 100},
        "gpio": {"mock": "yes"},
        "store": {"state_dir": str(state), "reserve_mb": 0},
        "web": {"token": TOKEN},
    }, "<browser-test>")
    app = build(cfg, classifier=decisive_classifier,
                source=(lambda: ReplaySource(SAMPLES, loop=True, hold_s=0.4), "replay"), web=None)
    svc = app.service
    server: WebServer | None = None
    try:
        server = serve(svc, "127.0.0.1", 0)
        yield svc, server
    finally:
        if server is not None:
            server.close()
        app.close()



def js_when(selector: str, condition: str) -> str:
    """A wait predicate on one element that is false while the element is absent.

    The page's script re-renders its panels, so an element can be briefly missing.
    """
    return f"() => {{ const e = document.querySelector({selector!r}); return !!e && ({condition}); }}"

def _page(browser, width: int, height: int):
    ctx = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1,
                              locale="en-GB", timezone_id="UTC")
    page = ctx.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    # A stream cut at teardown, or a thumbnail still loading when the test navigates away (the browser
    # aborts it: net::ERR_ABORTED), is not a page fault; every other failed request is.
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}")
            if "/api/events" not in r.url and "ERR_ABORTED" not in (r.failure or "") else None)
    return ctx, page, problems


def _int(page, selector: str) -> int:
    return int(page.inner_text(selector).strip() or 0)


def test_status_page_shows_verdict_and_tally_and_updates_live(browser, running) -> None:
    service, server = running
    classes = service.bundle.classes
    ctx, page, problems = _page(browser, 1280, 900)
    try:
        page.goto(server.url, wait_until="domcontentloaded")
        page.evaluate("window.__notReloaded = true")

        # a verdict appears: status pill, label, one score bar per class, quality figures
        page.wait_for_function(js_when("#verdict-status", "e.textContent.trim() !== '—'"),
                               timeout=WAIT_MS)
        assert page.inner_text("#verdict-status").strip().lower() in ("ok", "all detected", "retake", "refer")
        assert page.inner_text("#verdict-label").strip() not in ("", "No result yet")
        assert page.locator("#score-bars .bar-row").count() == len(classes)
        assert page.locator("#quality [data-key='sharpness'] dd").inner_text().strip() != ""
        assert page.locator("#field-image img").count() == 1

        # the slide tally appears, then grows, and the field changes, without a reload
        page.wait_for_function(js_when("#tally-total", "Number(e.textContent) > 0"), timeout=WAIT_MS)
        total0 = _int(page, "#tally-total")
        field0 = page.get_attribute("#field-image", "data-id")
        page.wait_for_function(js_when("#tally-total", f"Number(e.textContent) > {total0}"),
                               timeout=WAIT_MS)
        page.wait_for_function(js_when("#field-image", f"e.getAttribute('data-id') !== '{field0}'"),
                               timeout=WAIT_MS)
        assert page.evaluate("window.__notReloaded === true")
        assert page.inner_text("#slide-id").strip() == service.status().slide.id
        for c in classes:
            assert page.locator(f"#tally-body tr[data-key='{c}']").count() == 1

        # live events, not just polling, and the health panel
        page.wait_for_function(js_when("#conn", "e.getAttribute('data-state') === 'live'"),
                               timeout=WAIT_MS)
        assert page.inner_text("#health [data-key='model'] dd").strip() == service.bundle.name
        assert page.get_attribute("#health [data-key='sha256'] dd", "title") == service.bundle.model_sha256
        assert page.inner_text("#health [data-key='bundle'] dd").startswith(service.bundle.id)  # operator panel
        assert "ms" in page.inner_text("#health [data-key='p50'] dd")
        assert page.locator("#recent .thumb").count() > 0

        # the page's own buttons, with the token: a new slide starts and its tally starts again
        old_slide = page.inner_text("#slide-id").strip()
        page.fill("#token", TOKEN)
        with page.expect_response(lambda r: r.url.endswith("/api/slides/start")) as started:
            page.click("#start-btn")
        assert started.value.status == 201
        page.wait_for_function(js_when("#slide-id", f"e.textContent.trim() !== '{old_slide}'"),
                               timeout=WAIT_MS)
        new_slide = page.inner_text("#slide-id").strip()
        assert wait_until(lambda: (s := service.status().slide) is not None and s.id == new_slide, timeout=30)
        page.wait_for_function(js_when("#tally-total", "Number(e.textContent) >= 4"), timeout=WAIT_MS)
        if page.is_visible("#alert"):  # ALL was seen: acknowledge it from the page (it returns with the next ALL)
            with page.expect_response(lambda r: r.url.endswith("/api/alert/acknowledge")) as acked:
                page.click("#ack-btn")
            assert acked.value.status == 200

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(300)  # let the score-bar transition finish before the picture
        page.screenshot(path=str(SCREENSHOTS / "status-page.png"), full_page=True)
        assert (SCREENSHOTS / "status-page.png").stat().st_size > 20_000
        assert problems == [], problems
    finally:
        ctx.close()


def test_status_page_on_a_phone_and_the_slide_report(browser, running) -> None:
    service, server = running
    ctx, page, problems = _page(browser, 390, 844)
    try:
        page.goto(server.url, wait_until="domcontentloaded")
        page.wait_for_function(js_when("#tally-total", "Number(e.textContent) > 0"), timeout=WAIT_MS)
        # nothing wider than the phone's screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "status-page-phone.png"), full_page=False)

        # bench upload from the page: the result is shown pinned in the field panel
        sample = sorted(SAMPLES.glob("*.jpg"))[0]
        page.fill("#token", TOKEN)
        page.set_input_files("#upload-file", str(sample))
        with page.expect_response(lambda r: r.url.endswith("/api/classify")) as uploaded:
            page.click("#upload-btn")
        assert uploaded.value.status == 201
        rid = uploaded.value.json()["id"]
        page.wait_for_function(js_when("#field-image", f"e.getAttribute('data-id') === '{rid}'"),
                               timeout=WAIT_MS)
        assert page.is_visible("#pinned-note") and sample.name in page.inner_text("#tools-msg")

        report_url = page.get_attribute("#report-link", "href")
        page.goto(server.url.rstrip("/") + report_url, wait_until="load")
        assert "LeukoScreen slide report" in page.inner_text("h1")
        assert page.locator("tr.field-row").count() > 0
        assert "haematologist" in page.inner_text("#disclaimer")
        ctx2 = browser.new_context(viewport={"width": 1000, "height": 900}, device_scale_factor=1)
        p2 = ctx2.new_page()
        p2.goto(server.url.rstrip("/") + report_url, wait_until="load")
        p2.screenshot(path=str(SCREENSHOTS / "slide-report.png"), full_page=True)
        ctx2.close()
        assert problems == [], problems
    finally:
        ctx.close()

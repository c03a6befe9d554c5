"""The SVG in a real browser: hover, zoom, reset, search with Matched %, URL state.

Headless Chromium from Debian (``apt-get install -y chromium``) driven by the
Playwright Python package (``pip install playwright``; its own browser
download is not used).  The SVG is served over HTTP on 127.0.0.1 because the
script keeps zoom/search state in the URL with ``history.replaceState``.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from buildtel.shared.flamegraph import SVGFlameGraphGenerator, parse_folded
from tests.browser import chromium

# total 98000 -> 0.01204 px per count; minwidth 0.1 px = 8.3 counts, so each
# t<i> (8 counts) is too narrow to draw while "small" (8000) is ~96 px wide.
FOLDED = "main;big;work 90000\n" + "".join(f"main;small;t{i} 8\n" for i in range(1000))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d: Path = tmp_path_factory.mktemp("svg")
    (d / "fg.svg").write_text(SVGFlameGraphGenerator().render(parse_folded(FOLDED)), encoding="utf-8")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(d)))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/fg.svg"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from chromium()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    pg = browser.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
    finally:
        pg.close()
    assert errors == []


def frame(page: Page, name: str):
    return page.locator("#frames > g", has=page.locator("title", has_text=f"{name} (")).first


def matched(page: Page) -> str:
    page.wait_for_function("document.getElementById('matched').textContent.indexOf('Matched') === 0")
    return page.locator("#matched").text_content() or ""


def search(page: Page, term: str) -> None:
    page.once("dialog", lambda d: d.accept(term))
    page.locator("#search").click()


def test_hover_shows_self_and_total(page: Page, served: str) -> None:
    page.goto(served)
    frame(page, "small").hover()
    assert page.locator("#details").text_content() == \
        "Function: small (8,000 us, 8.16%; self 0 us)"
    frame(page, "work").hover()
    assert page.locator("#details").text_content() == \
        "Function: work (90,000 us, 91.84%; self 90,000 us)"


def test_click_zooms_and_reset_restores(page: Page, served: str) -> None:
    page.goto(served)
    small, big = frame(page, "small"), frame(page, "big")
    before = small.locator("rect").get_attribute("x"), small.locator("rect").get_attribute("width")
    assert before == ("1093.7", "96.3")
    small.click()
    assert (small.locator("rect").get_attribute("x"), small.locator("rect").get_attribute("width")) == \
        ("10.0", "1180.0")
    assert small.locator("text").text_content() == "small"
    assert "hide" in (big.get_attribute("class") or "")
    assert "parent" in (frame(page, "main").get_attribute("class") or "")
    assert page.locator("#unzoom").is_visible()
    assert "?x=1093.7&y=53" in page.url
    page.locator("#unzoom").click()
    assert (small.locator("rect").get_attribute("x"), small.locator("rect").get_attribute("width")) == before
    assert big.is_visible() and not page.locator("#unzoom").is_visible()
    assert "x=" not in page.url


def test_search_counts_frames_too_narrow_to_draw(page: Page, served: str) -> None:
    page.goto(served)
    assert page.locator("#frames title", has_text="t1 (").count() == 0  # not drawn
    search(page, "^t[0-9]+$")
    # 1000 lines x 8 = 8000 of 98000 -> 8.2 % (flamegraph.pl would find nothing drawn)
    assert matched(page) == "Matched: 8.2%"
    assert page.locator("#search").text_content() == "Reset Search"
    assert "s=%5Et%5B0-9%5D%2B%24" in page.url
    # zoomed into "small", every line under it matches
    frame(page, "small").click()
    page.wait_for_function("document.getElementById('matched').textContent === 'Matched: 100%'")
    # while searching the button resets the search (no prompt)
    page.locator("#search").click()
    assert not page.locator("#matched").is_visible()
    assert "s=" not in page.url
    page.locator("#unzoom").click()
    # drawn matches are highlighted
    search(page, "^big$")
    assert matched(page) == "Matched: 91.8%"
    assert frame(page, "big").locator("rect").get_attribute("fill") == "rgb(230,0,230)"
    assert frame(page, "work").locator("rect").get_attribute("fill") != "rgb(230,0,230)"


def test_case_toggle_and_url_state_restore(page: Page, served: str) -> None:
    page.goto(served)
    search(page, "^T[0-9]+$")
    assert matched(page) == "Matched: 0.0%"
    page.locator("#ignorecase").click()
    page.wait_for_function("document.getElementById('matched').textContent === 'Matched: 8.2%'")
    # reload with zoom + search in the URL, as flamegraph.pl does
    page.goto(served + "?x=1093.7&y=53&s=%5Esmall%24")
    assert frame(page, "small").locator("rect").get_attribute("width") == "1180.0"
    assert matched(page) == "Matched: 100%"
    assert frame(page, "small").locator("rect").get_attribute("fill") == "rgb(230,0,230)"

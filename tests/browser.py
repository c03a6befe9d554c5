"""The browser of the browser tests: Debian's Chromium (``apt-get install chromium``; ``.ci/run``
installs it) driven by Playwright's Python package, never Playwright's own browser download."""

from __future__ import annotations

from collections.abc import Iterator

from playwright.sync_api import Browser, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium() -> Iterator[Browser]:
    """A headless Chromium for a module's tests (a fixture body: ``yield from chromium()``)."""
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()

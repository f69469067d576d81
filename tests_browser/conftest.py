"""The rendered book in a real browser: Debian's headless Chromium driven by selenium.

These tests read the HTML that ``make book-strict`` left in ``_build/html``; they never build the
book. One local HTTP server and one browser serve the whole session. The pages under test are the
ones ``_toc.yml`` names, so a chapter added to the table of contents is checked without editing
this folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from book_site import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS, HTML


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        raise pytest.UsageError(
            f"{', '.join(missing)} not found: run `make chromium` (Debian's chromium and "
            "chromium-driver), or set CHROMIUM / CHROMEDRIVER to their paths."
        )
    if not (HTML / "search.html").is_file():
        raise pytest.UsageError(
            f"{HTML} holds no built book: run `make book-strict` first "
            "(book-check reads the build, it does not make one)."
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def base_url():
    """``http://127.0.0.1:PORT/`` serving ``_build/html`` for the session."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=HTML,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "search.html", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"python -m http.server on port {port} did not start") from None
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session, with a fresh empty profile and its console log."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.TemporaryDirectory(prefix="book-check-chromium-")
    options.add_argument(f"--user-data-dir={profile.name}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    profile.cleanup()


@pytest.fixture
def open_page(browser, base_url):
    """Load a page (``book/intro`` or ``search.html?q=…``) with an empty console log; returns
    the driver."""

    def load(page: str):
        browser.get_log("browser")  # drop what earlier pages logged
        path = page if "." in page.split("/")[-1] else f"{page}.html"
        browser.get(base_url + path)
        return browser

    return load

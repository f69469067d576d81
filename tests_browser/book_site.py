"""Where the built book and the browser are, and which pages the book has.

Shared by the fixtures (``conftest.py``) and the tests; a module of its own so that its name
cannot clash with ``tests/conftest.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
# Debian's packages `chromium` and `chromium-driver` (`make chromium` installs them).
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
# Headless without a sandbox (CI runs as root) or a GPU, with a fresh profile added by the fixture.
# The background connections (updates, sync, QUIC probes) are switched off: a machine without a
# network refuses them, and they have nothing to do with the book.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


def _toc_files(entries: list[dict]) -> list[str]:
    files = []
    for entry in entries:
        if "file" in entry:
            files.append(entry["file"])
        for key in ("chapters", "sections"):
            files += _toc_files(entry.get(key, []))
    return files


def toc_pages() -> list[str]:
    """Every document of ``_toc.yml`` in reading order, without suffix (``book/intro``)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"], *_toc_files(toc.get("parts", [])), *_toc_files(toc.get("chapters", []))]


def is_notebook(page: str) -> bool:
    """Whether the page's source is a notebook (a MyST ``.md`` with a kernelspec), so it has an
    ``.ipynb`` twin and a Colab launch button."""
    text = (ROOT / f"{page}.md").read_text()
    if not text.startswith("---\n"):
        return False
    front_matter = text.split("---\n", 2)[1]
    return "kernelspec:" in front_matter

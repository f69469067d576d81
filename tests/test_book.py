"""The book's sources: every MyST notebook has an in-sync .ipynb twin and is in the table of
contents; chapters import code from the package instead of pasting it."""

from pathlib import Path

import jupytext
import pytest
import yaml

pytestmark = pytest.mark.requires("book")

ROOT = Path(__file__).resolve().parents[1]


def is_notebook(page: Path) -> bool:
    """A MyST notebook starts with front matter holding a jupytext section."""
    text = page.read_text()
    return text.startswith("---") and "jupytext:" in text.split("---")[1]


NOTEBOOKS = sorted(p for p in (ROOT / "book").rglob("*.md") if is_notebook(p))


def cells(notebook):
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def test_every_chapter_is_a_notebook_and_there_are_ten():
    # Foundations 2, MLPerf 1, Workloads 6, Porting 1; the root page (intro) is prose.
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    chapters = {ch["file"] for part in toc["parts"] for ch in part["chapters"]}
    assert {str(p.relative_to(ROOT).with_suffix("")) for p in NOTEBOOKS} == chapters
    assert len(NOTEBOOKS) == 10


@pytest.mark.parametrize("md", NOTEBOOKS, ids=lambda p: p.name)
def test_ipynb_twin_is_in_sync(md):
    ipynb = md.with_suffix(".ipynb")
    assert ipynb.exists(), f"{md.name} has no paired .ipynb: run `jupytext --sync {md}`"
    assert cells(jupytext.read(md)) == cells(jupytext.read(ipynb)), (
        f"{md.name} and {ipynb.name} differ: run `jupytext --sync {md}`"
    )


@pytest.mark.parametrize("md", NOTEBOOKS, ids=lambda p: p.name)
def test_ipynb_twin_has_no_stored_outputs(md):
    nb = jupytext.read(md.with_suffix(".ipynb"))
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_every_book_page_is_in_the_toc():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    listed = {toc["root"]} | {ch["file"] for part in toc["parts"] for ch in part["chapters"]}
    pages = {str(p.relative_to(ROOT).with_suffix("")) for p in (ROOT / "book").rglob("*.md")}
    assert pages == listed

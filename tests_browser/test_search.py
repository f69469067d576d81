"""The book's search page, run by Sphinx's own JavaScript in the browser."""

from __future__ import annotations

from book_site import ROOT, toc_pages
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def search(open_page, query: str) -> tuple[str, list[str]]:
    """The summary line and the result links' paths (``book/optimizers``) for ``query``."""
    driver = open_page(f"search.html?q={query}")
    summary = WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#search-results p.search-summary").text
    )
    links = driver.find_elements(By.CSS_SELECTOR, "#search-results ul.search li a[href]")
    base = driver.current_url.split("search.html")[0]
    paths = [a.get_attribute("href").removeprefix(base).split(".html")[0] for a in links]
    return summary, paths


def test_search_finds_lamb(open_page):
    # The pages whose source names LAMB; the search must list at least one of them.
    sources = [page for page in toc_pages() if "LAMB" in (ROOT / f"{page}.md").read_text()]
    assert sources, "no page of the book mentions LAMB"
    summary, found = search(open_page, "LAMB")
    assert found, summary
    assert set(found) & set(sources), (found, sources)


def test_search_reports_no_match(open_page):
    summary, found = search(open_page, "qzxwvutsnomatch")
    assert found == []
    assert "did not match" in summary

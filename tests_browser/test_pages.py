"""Every page of the book as a reader's browser shows it."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from book_site import HTML, is_notebook, toc_pages
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from mlperf_tutor import project

PAGES = toc_pages()

# MyST that reached the page as text instead of being parsed: a fence or colon fence opening a
# directive, a directive's name in braces, or a role left unrendered.
RAW_MYST = re.compile(
    r"(?:^|\n)[ \t]*:{3,}"  # a colon fence at the start of a line, opening or closing
    r"|:::+[ \t]*\{|```+[ \t]*\{"  # a fence opening a directive, anywhere
    r"|\{(?:literalinclude|tab-set|tab-item|code-cell|figure|glue|admonition|note)\}"
    r"|\{(?:doc|ref|numref|eq|math|term|download)\}`"  # a role left unrendered
)


def severe_console_entries(log: list[dict], base_url: str) -> list[str]:
    """The console entries of level SEVERE that are the book's fault.

    Two kinds are left out, each because it is about the test machine, not the book:
    - a resource on another host that failed with ``net::ERR_...``: this machine has no network
      beyond the package registries, so MathJax from its CDN cannot load here (a 404 from any host,
      and every JavaScript error, still counts);
    - ``/favicon.ico`` answered 404: Chromium asks every origin for it on its own; the book
      declares no icon and the test server is not the book's web host.
    """
    errors = []
    for entry in log:
        if entry["level"] != "SEVERE":
            continue
        message = entry["message"]
        source = message.split(" ", 1)[0]
        offline = "net::ERR_" in message and not source.startswith(base_url)
        favicon = source == base_url + "favicon.ico" and "status of 404" in message
        if not (offline or favicon):
            errors.append(message)
    return errors


def test_toc_pages_are_the_built_pages():
    built = {
        p.relative_to(HTML).with_suffix("").as_posix()
        for p in HTML.rglob("*.html")
        if not p.relative_to(HTML).parts[0].startswith("_")
    }
    # Sphinx's own pages, and index.html: the redirect to the root document.
    built -= {"genindex", "search", "index"}
    assert built == set(PAGES)


def test_site_root_opens_the_first_page(open_page, base_url):
    driver = open_page("index.html")
    WebDriverWait(driver, 10).until(lambda d: not d.current_url.endswith("index.html"))
    assert driver.current_url == f"{base_url}{PAGES[0]}.html"


def test_console_filter_keeps_book_errors():
    base_url = "http://127.0.0.1:8000/"
    log = [
        {"level": "SEVERE", "message": f"{base_url}book/x.html 3:1 Uncaught ReferenceError: y"},
        {
            "level": "SEVERE",
            "message": f"{base_url}_static/a.js - Failed to load resource: "
            "the server responded with a status of 404 (File not found)",
        },
        {
            "level": "SEVERE",
            "message": f"{base_url}_static/b.js - Failed to load resource: "
            "net::ERR_CONNECTION_REFUSED",
        },
        {
            "level": "SEVERE",
            "message": "https://cdn.example/m.js - Failed to load resource: "
            "net::ERR_NAME_NOT_RESOLVED",
        },
        {
            "level": "SEVERE",
            "message": f"{base_url}favicon.ico - Failed to load resource: "
            "the server responded with a status of 404 (File not found)",
        },
        {"level": "WARNING", "message": f"{base_url}book/x.html 1:1 a warning"},
    ]
    assert severe_console_entries(log, base_url) == [m["message"] for m in log[:3]]


@pytest.mark.parametrize("page", [*PAGES, "genindex"])
def test_page_loads_without_console_errors(open_page, base_url, page):
    driver = open_page(page)
    assert driver.execute_script("return document.readyState") == "complete"
    assert driver.find_elements(By.CSS_SELECTOR, "main article, article.bd-article")
    assert severe_console_entries(driver.get_log("browser"), base_url) == []


@pytest.mark.parametrize("page", PAGES)
def test_page_shows_no_raw_myst(open_page, page):
    driver = open_page(page)
    # textContent, unlike innerText, includes the panels of tabs that are not selected.
    text = driver.execute_script("return document.querySelector('main').textContent")
    assert len(text) > 200, "the page's <main> is (nearly) empty"
    found = [m.group(0).strip() for m in RAW_MYST.finditer(text)]
    assert found == []


def test_raw_myst_pattern_catches_directives():
    samples = [
        ":::{tab-item} PyTorch",
        "::::{tab-set}",
        "```{literalinclude} ../../mlperf_tutor/x.py",
        "```{code-cell} ipython3",
        "see {doc}`bert`",
        "text {literalinclude} text",
        "para\n::::\n",
        "inline :::{note} text",
    ]
    assert all(RAW_MYST.search(s) for s in samples)
    assert not RAW_MYST.search("x = a[::2]; d = {'k': 1}  # dict")


@pytest.mark.parametrize("page", PAGES)
def test_every_tab_switches(open_page, page):
    driver = open_page(page)
    tab_sets = driver.find_elements(By.CSS_SELECTOR, ".sd-tab-set")
    for tab_set in tab_sets:
        inputs = tab_set.find_elements(By.CSS_SELECTOR, ":scope > input")
        labels = tab_set.find_elements(By.CSS_SELECTOR, ":scope > label.sd-tab-label")
        panels = tab_set.find_elements(By.CSS_SELECTOR, ":scope > .sd-tab-content")
        assert len(inputs) == len(labels) == len(panels) >= 2
        # Click in reverse so that every tab, the first included, goes from hidden to shown.
        for index in reversed(range(len(labels))):
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", labels[index])
            labels[index].click()
            name = labels[index].text
            assert inputs[index].is_selected(), f"tab {name!r} was not selected by its click"
            shown = [panel.is_displayed() for panel in panels]
            assert shown == [i == index for i in range(len(panels))], f"after clicking {name!r}"


def test_the_book_has_tabs(open_page):
    counts = {
        page: len(open_page(page).find_elements(By.CSS_SELECTOR, ".sd-tab-set")) for page in PAGES
    }
    # The workload chapters show their model in three framework tabs; the HTML must have them.
    workloads = [page for page in PAGES if page.startswith("book/workloads/")]
    assert workloads and all(counts[page] >= 1 for page in workloads), counts


@pytest.mark.parametrize("page", PAGES)
def test_every_image_has_a_size(open_page, page):
    driver = open_page(page)
    # driver.get returned after the load event, so every <img> has loaded or failed by now.
    images = driver.execute_script(
        """
        return Array.from(document.images).map(img => {
          const box = img.getBoundingClientRect();
          return {src: img.getAttribute('src'), natural: [img.naturalWidth, img.naturalHeight],
                  shown: img.checkVisibility(), box: [box.width, box.height]};
        });
        """
    )
    broken = [img["src"] for img in images if min(img["natural"]) <= 0]
    flat = [img["src"] for img in images if img["shown"] and min(img["box"]) <= 0]
    assert broken == []
    assert flat == []


def test_the_book_has_figures(open_page):
    # Plots drawn by the chapters' cells must reach the page as images (the article's own, not
    # the launch button's logo in the page header).
    figures = "article.bd-article img"
    total = sum(len(open_page(page).find_elements(By.CSS_SELECTOR, figures)) for page in PAGES)
    assert total >= 1


@pytest.mark.parametrize("page", PAGES)
def test_repository_link_is_the_configured_repository(open_page, page):
    driver = open_page(page)
    buttons = driver.find_elements(By.CSS_SELECTOR, "a.btn-source-repository-button")
    assert [b.get_attribute("href") for b in buttons] == [project.REPOSITORY]


def colab_links(driver, selector: str = "a[href]") -> list:
    return [
        a
        for a in driver.find_elements(By.CSS_SELECTOR, selector)
        if urlsplit(a.get_attribute("href")).hostname == "colab.research.google.com"
    ]


@pytest.mark.parametrize("page", PAGES)
def test_colab_launch_button_opens_the_pages_notebook(open_page, page):
    driver = open_page(page)
    launch = colab_links(driver, ".dropdown-launch-buttons a[href]")
    expected = [project.colab_url(f"{page}.ipynb")] if is_notebook(page) else []
    assert [a.get_attribute("href") for a in launch] == expected
    if launch:
        # The link sits in the launch menu: a reader sees it once the rocket button is clicked.
        assert not launch[0].is_displayed()
        driver.find_element(By.CSS_SELECTOR, ".dropdown-launch-buttons button").click()
        WebDriverWait(driver, 5).until(lambda d: launch[0].is_displayed())


@pytest.mark.parametrize("page", PAGES)
def test_every_colab_link_is_in_the_repository(open_page, page):
    # Links to Colab in a chapter's text, as well as the launch button, open this repository.
    prefix = project.colab_url("")
    hrefs = [a.get_attribute("href") for a in colab_links(open_page(page))]
    assert [h for h in hrefs if not h.startswith(prefix)] == []


@pytest.mark.parametrize("page", PAGES)
def test_no_assert_shows_in_code_cells(open_page, page):
    # The checks that keep a chapter honest stay in it, but hidden from the reader: a cell tagged
    # remove-input (or hide-input, folded away) shows no assert lines on the page.
    driver = open_page(page)
    shown = driver.execute_script(
        """
        return Array.from(document.querySelectorAll('article .cell_input pre'))
          .filter(pre => pre.checkVisibility())
          .flatMap(pre => pre.textContent.split('\\n'))
          .filter(line => /^\\s*assert\\b/.test(line));
        """
    )
    assert shown == [], f"{len(shown)} assert lines show on {page}"

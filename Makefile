# The two commands a newcomer runs: `make book` and `make test`.
# Both create .venv from the pinned requirements.txt when it is missing or out of date.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The browser book-check drives: Debian's packages chromium and chromium-driver.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
# TensorFlow's C++ logging is silenced for our own runs only (a user's setting wins).
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: book test unit notebooks book-strict book-check chromium lint clean

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build --keep-going .
	@echo "Book: $(CURDIR)/_build/html/index.html"

# Whole suite: unit and parity tests, notebooks through pytest-notebook, strict book build, the
# built book in a real browser.
test: lint unit notebooks book-strict book-check

lint: $(STAMP)
	$(BIN)/ruff check mlperf_tutor tests benchmarks tests_browser book/_ext
	$(BIN)/ruff format --check mlperf_tutor tests benchmarks tests_browser book/_ext

# A skipped test fails the run (tests/conftest.py lists the skips and the extra each needs);
# `make test ALLOW_SKIPS=1` lets a machine without every extra pass with skips.
unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

notebooks: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --nb-test-files --nb-exec-timeout 600 book/

book-strict: $(STAMP)
	rm -rf _build
	$(BIN)/jupyter-book build --warningiserror --nitpick --keep-going .
	@echo "Book: $(CURDIR)/_build/html/index.html"

# The book as a reader's browser shows it (tests_browser/): every page without console errors or
# raw MyST, every tab switching, every image with a size, the Colab and repository links, search.
# It reads the book that book-strict (or book) built and never builds one itself.
book-check: $(STAMP) chromium
	@test -f _build/html/search.html || { echo "no built book in _build/html: run make book-strict first"; exit 1; }
	CHROMIUM=$(CHROMIUM) CHROMEDRIVER=$(CHROMEDRIVER) $(BIN)/python -m pytest -q -p no:cacheprovider tests_browser

# Debian's Chromium and its WebDriver for book-check, installed when missing (CI starts without).
chromium:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then exit 0; fi; \
	command -v apt-get >/dev/null || { echo "book-check needs Chromium and chromedriver: install them (Debian: chromium chromium-driver) or set CHROMIUM=... CHROMEDRIVER=..."; exit 1; }; \
	sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	echo "installing Debian's chromium and chromium-driver"; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium chromium-driver >/dev/null

clean:
	rm -rf _build .pytest_cache

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

.PHONY: book test unit notebooks book-strict book-check chromium lint twins colab-check colab-check-tpu clean dist test-min

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build --keep-going .
	@echo "Book: $(CURDIR)/_build/html/index.html"

# Whole suite: lint, unit and parity tests, then the strict book build, which is the one place
# the chapters execute (a raising cell fails it: allow_errors is false and warnings are errors),
# then the built book in a real browser.
test: lint unit book-strict book-check

LINTED := mlperf_tutor tests benchmarks tools tests_browser book/_ext
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

# A skipped test fails the run (tests/conftest.py lists the skips and the extra each needs);
# `make test ALLOW_SKIPS=1` lets a machine without every extra pass with skips.
# Two pytest workers (pytest-xdist): much of a test's time is single-threaded compilation, so
# the two cores of the CI machine are used together. Each test file runs whole on one worker
# (--dist loadfile), so its module-scoped fixtures (models built and compiled once per module)
# are built once, not once per worker. The 30 slowest tests are listed at the end.
unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=30 tests

# Execute every chapter once: the strict book build does it (kept as a name for habit).
notebooks: book-strict

book-strict: $(STAMP)
	rm -rf _build
	$(BIN)/jupyter-book build --warningiserror --nitpick --keep-going .
	@echo "Book: $(CURDIR)/_build/html/index.html"

# The wheel and the sdist, into dist/ (package data included: mlperf_tutor/mlperf/data/*.csv).
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	rm -rf mlperf_tutor.egg-info  # setuptools' leftover; found on sys.path, it shadows the metadata
	$(BIN)/python .ci/check_wheel.py dist/*.whl

# The lowest versions pyproject.toml declares, tested: a fresh venv gets the wheel of `make dist`
# with the extras below, at exactly those versions (.ci/lowest_requirements.py writes the pins),
# and runs the adapter, optimizer and parity tests (BERT for the workload) against the installed
# wheel, not the source tree. torch is the exception: the declared minimum has no CPU build on the
# project machines, which carry 2.13.0.
MIN_VENV := _build/venv-min
MIN_EXTRAS := torch jax tf
MIN_REPLACE := --replace torch==2.13.0
comma := ,
empty :=
space := $(empty) $(empty)

test-min: dist
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(BIN)/python .ci/lowest_requirements.py $(MIN_EXTRAS) $(MIN_REPLACE) > $(MIN_VENV)/lowest.txt
	$(MIN_VENV)/bin/python -m pip install -q --disable-pip-version-check -c $(MIN_VENV)/lowest.txt \
		"$$(ls dist/*.whl)[$(subst $(space),$(comma),$(MIN_EXTRAS))]" pytest packaging
	$(MIN_VENV)/bin/python -m pip freeze --disable-pip-version-check > $(MIN_VENV)/installed.txt
	$(BIN)/python .ci/lowest_requirements.py --check $(MIN_VENV)/installed.txt $(MIN_EXTRAS) $(MIN_REPLACE)
	cd $(MIN_VENV) && bin/python -c "import mlperf_tutor as m; assert 'site-packages' in m.__file__, m.__file__"
	$(MIN_VENV)/bin/pytest -q -p no:cacheprovider tests/test_adapter_contract.py tests/test_optimizers.py
	$(MIN_VENV)/bin/pytest -q -p no:cacheprovider tests/test_workload_contract.py -k "bert and not convert"

# Rewrite every chapter's install cell (from mlperf_tutor/project.py) and its .ipynb twin (for
# Colab: includes expanded, tabs as headed sections). tests/test_book.py fails when they are stale.
twins: $(STAMP)
	$(BIN)/python tools/twins.py

# Colab-like runs (not in CI; they download several GB): a fresh Python 3.12 venv with the newest
# torch (CUDA build, with triton), jax, flax, optax, TensorFlow and Keras that pip resolves, then
# every twin run top to bottom with its own install cell installing this checkout
# (MLPERF_TUTOR_SOURCE). The -tpu variant has no TensorFlow and installs the TPU extras.
# Executed notebooks and timings go to .colab/<runtime>/.
COLAB_PYTHON ?= python3.12
colab-check: $(STAMP)
	$(BIN)/python tools/colab_check.py --python $(COLAB_PYTHON) --runtime gpu

colab-check-tpu: $(STAMP)
	$(BIN)/python tools/colab_check.py --python $(COLAB_PYTHON) --runtime tpu
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
	rm -rf _build .pytest_cache .colab dist

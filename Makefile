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
# Two settings that make the tests and the chapters faster on a CPU without changing a number
# they compute (a user's own setting wins):
# - glibc's malloc hands every freed block of 32 MiB or more back to the kernel and maps it
#   afresh, zero-filled, at the next allocation. Tiny gpt3's 2048-token attention scores are such
#   blocks, a few per step: measured on the 2-core CI machine, 8 torch steps of tiny gpt3 took
#   48 s, 35 s of them in the kernel; with malloc keeping its memory, 32 s and 1 s.
# - JAX's persistent compilation cache (its own engine, keyed on the program and the devices):
#   the same jitted step compiled by several test files and chapters compiles once per run.
#   With a size limit JAX locks the directory around each read and write (two pytest workers
#   share it). `make clean` removes it.
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_COMPILATION_CACHE_MAX_SIZE ?= 8589934592

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
# Each worker's PyTorch computes on one thread (OMP_NUM_THREADS, unless set): with two threads
# in each of two workers on two cores, its OpenMP threads spin at every barrier waiting for a
# thread that is not running (measured on six test files: 200 s with two threads, 160 s with one).
unit: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=30 tests

# Execute every chapter once: the strict book build does it (kept as a name for habit).
notebooks: book-strict

# `jupyter-book build --warningiserror --nitpick --keep-going .` with the chapters executing in
# BOOK_JOBS processes at once (Sphinx's parallel read; jupyter-book's CLI has no -j), PyTorch
# on one thread in each, as in `make unit`.
BOOK_JOBS ?= 2
book-strict: $(STAMP)
	rm -rf _build
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python tools/build_book.py --strict --jobs $(BOOK_JOBS)
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
	rm -rf _build .pytest_cache .colab dist .jax_cache

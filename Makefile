# The two commands a newcomer runs: `make book` and `make test`.
# Both create .venv from the pinned requirements.txt when it is missing or out of date.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# TensorFlow's C++ logging is silenced for our own runs only (a user's setting wins).
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: book test unit notebooks book-strict lint clean dist test-min

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build --keep-going .
	@echo "Book: $(CURDIR)/_build/html/index.html"

# Whole suite: unit and parity tests, notebooks through pytest-notebook, strict book build.
test: lint unit notebooks book-strict

lint: $(STAMP)
	$(BIN)/ruff check mlperf_tutor tests benchmarks
	$(BIN)/ruff format --check mlperf_tutor tests benchmarks

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

clean:
	rm -rf _build .pytest_cache dist

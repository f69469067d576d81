"""The test suite's two rules: tests declare the extras they need, and no test is skipped.

Extras
    A test that needs an optional extra of ``pyproject.toml`` (torch, jax, tf, hf, data, book,
    dev) declares it with ``@pytest.mark.requires("hf")``; a module whose tests all need one
    declares ``pytestmark = pytest.mark.requires("torch")`` (several extras: one call with several
    names). Where an extra's packages are missing (or older than pyproject.toml asks), the test is
    skipped with the reason ``pip install "mlperf-tutor[EXTRA]"``.

    A module that imports a framework at its top would crash collection where the framework is
    missing, before any marker is seen. So this file reads each test module's ``pytestmark``
    from its source (with ``ast``, importing nothing) before pytest imports the module; when an
    extra it names is missing, the module is reported as one skipped collector and never
    imported. That is why ``pytestmark`` must be a literal: ``pytest.mark.requires("a", "b")`` or
    a list of marks, with string names. A test's own marker is checked when the test runs (its
    framework imports belong inside the test). Helper modules (``checks``, ``numpy_reference``,
    ``sd_reference``, ``torch_models``) import what they need; the tests that use them declare it.

    Which packages make an extra is read from ``pyproject.toml``'s
    ``[project.optional-dependencies]``, so the two cannot drift apart: each must be importable
    (``importlib.util.find_spec``, nothing imported but parent packages) in a version the
    requirement accepts (``importlib.metadata``).

Skips fail the run
    A skip means something went untested, so a run with a skipped test exits with status 1
    (after listing the skips), even when everything else passed. ``ALLOW_SKIPS=1`` allows them,
    for a machine without every extra: ``ALLOW_SKIPS=1 make test``. ``--collect-only`` runs are
    exempt.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import os
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

# This process runs torch as its CPU build does, without triton. Test modules import
# TensorFlow themselves, before the package could load triton ahead of it
# (mlperf_tutor.frameworks.runtime), and triton loaded after TensorFlow aborts the process
# (LLVM ERROR). tests/test_framework_imports.py runs the three frameworks with triton in
# subprocesses, where the package chooses the order.
sys.modules.setdefault("triton", None)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PACKAGE = "mlperf-tutor"

_skips: list[tuple[str, str]] = []  # (node id, reason) of every skipped test or module


@functools.cache
def extras() -> dict[str, tuple[str, ...]]:
    """Extra name -> its requirement strings, from pyproject.toml."""
    data = tomllib.loads(PYPROJECT.read_text())
    return {k: tuple(v) for k, v in data["project"]["optional-dependencies"].items()}


# Import names of the distributions whose name does not say it (the others: "-" -> "_").
MODULES = {
    "orbax-checkpoint": "orbax.checkpoint",
    "scikit-learn": "sklearn",
    "jupyter-book": "jupyter_book",
    "pytest-xdist": "xdist",
}


@functools.cache
def _top_level_providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def problem(text: str) -> str | None:
    """What is wrong with the requirement ``text`` here (not importable, or too old), or None.

    Checked through the import name, not the distribution's: ``tensorflow`` may come from the
    ``tensorflow-cpu`` distribution. Versions are those of the distributions providing it.
    """
    req = Requirement(text)
    module = MODULES.get(req.name, req.name.replace("-", "_"))
    if importlib.util.find_spec(module) is None:
        return req.name
    providers = _top_level_providers().get(module.split(".")[0], [])
    versions = sorted({importlib.metadata.version(d) for d in providers})
    if versions and not any(req.specifier.contains(v, prereleases=True) for v in versions):
        return f"{text} (found {', '.join(versions)})"
    return None


@functools.cache
def missing(extra: str) -> tuple[str, ...]:
    """The requirements of ``extra`` that are not met here; () when the extra is usable.

    Raises:
        pytest.UsageError: ``extra`` is not an extra of pyproject.toml.
    """
    if extra not in extras():
        choices = sorted(extras())
        raise pytest.UsageError(
            f'requires("{extra}"): no such extra in pyproject.toml; choose one of {choices}'
        )
    out = []
    for text in extras()[extra]:
        req = Requirement(text)
        if req.name == PACKAGE:  # "all" names other extras
            out += [m for e in sorted(req.extras) for m in missing(e)]
        elif (why := problem(text)) is not None:
            out.append(why)
    return tuple(out)


def skip_reason(names) -> str | None:
    """Why a test needing the extras ``names`` cannot run here, or None when it can."""
    absent = {e: missing(e) for e in names if missing(e)}
    if not absent:
        return None
    extra = ",".join(absent)
    found = "; ".join(f"{e}: {', '.join(m)}" for e, m in absent.items())
    return f'needs pip install "mlperf-tutor[{extra}]" (missing {found})'


def declared_extras(path: Path) -> list[str]:
    """The extras named by ``requires`` marks in a module's top-level ``pytestmark``, read from
    its source.

    Raises:
        pytest.UsageError: a ``requires`` mark whose arguments are not string literals.
    """
    module = ast.parse(path.read_bytes(), filename=str(path))
    names = []
    for node in module.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if not any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets):
            continue
        for call in ast.walk(node.value):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
                continue
            if call.func.attr != "requires":
                continue
            for arg in call.args:
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                    raise pytest.UsageError(
                        f"{path}:{call.lineno}: pytestmark's requires() takes string literals "
                        "(this file reads them without importing the module)"
                    )
                names.append(arg.value)
    return names


class _MissingExtras(pytest.Module):
    """A test module whose extras are missing: one skip, and the module is never imported."""

    reason = ""

    def collect(self):
        pytest.skip(self.reason)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "requires(*extras): needs these extras of pyproject.toml (torch, jax, tf, hf, data, book, "
        "dev); skipped where one is missing (see tests/conftest.py)",
    )


def pytest_pycollect_makemodule(module_path, parent):
    reason = skip_reason(declared_extras(module_path))
    if reason is None:
        return None  # pytest's own Module
    module = _MissingExtras.from_parent(parent, path=module_path)
    module.reason = reason
    return module


def pytest_runtest_setup(item):
    names = [e for mark in item.iter_markers("requires") for e in mark.args]
    if not all(isinstance(e, str) for e in names):
        raise pytest.UsageError(f"{item.nodeid}: requires() takes extra names, got {names}")
    reason = skip_reason(names)
    if reason is not None:
        pytest.skip(reason)


def _record(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _skips.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_collectreport(report):
    _record(report)


def pytest_runtest_logreport(report):
    _record(report)


def skips_allowed() -> bool:
    return os.environ.get("ALLOW_SKIPS", "").strip().lower() in ("1", "true", "yes")


def pytest_sessionfinish(session, exitstatus):
    if _skips and not skips_allowed() and not session.config.option.collectonly:
        if exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _skips or skips_allowed() or config.option.collectonly:
        return
    terminalreporter.write_sep("=", f"{len(_skips)} skipped: the run fails", red=True)
    for nodeid, reason in _skips:
        terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}")
    terminalreporter.write_line(
        "A skipped test is an untested one. Install the extras named above, or set "
        "ALLOW_SKIPS=1 to let the run pass with skips."
    )

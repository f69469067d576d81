"""Framework adapters: ``mlperf_tutor.frameworks.torch``, ``.jax`` and ``.tf``.

Each adapter is a module with the same functions, so generic code (parity, convert, train, the
CLI) never special-cases a framework. Get one with :func:`get`, which imports the framework only
then and says which extra to install when it is missing; :func:`require` gets several for one
purpose and names every missing one. A missing framework is normal (a TPU runtime has no
TensorFlow): :func:`installed` lists those usable here, :func:`present` guards a notebook cell.
:mod:`.runtime` prepares the process before a framework's first import (triton before
TensorFlow, memory behaviour of JAX and TensorFlow).

The adapter contract (every adapter module provides these names):

Arrays, seeding, precision, devices
    ``NAME``: "torch", "jax" or "tf".
    ``to_numpy(x) -> np.ndarray`` and ``from_numpy(a, dtype=None)``.
    ``seed(n)``: seeds the framework's global generators (JAX: also returns a ``jax.random.key``).
    ``pin_precision()``: float32 math without TF32 / reduced-precision matmuls (parity mode).
    ``devices() -> list[str]`` and ``device_summary() -> str`` (one line for notebooks).

Layout rules (canonical = PyTorch ``state_dict`` names and layouts)
    ``to_canonical(model) -> dict[str, np.ndarray]``: parameters and buffers (BatchNorm running
    statistics; never ``num_batches_tracked``).
    ``load_canonical(model, tree)``: strict; one ``CheckpointMismatch`` listing every missing,
    unexpected and misshapen key, and the model unchanged on error.
    ``trainable_names(model) -> list[str]``: canonical names of the trainable parameters.
    ``set_trainable(model, trainable)``: train only the parameters whose canonical name the
    predicate accepts; the others are frozen (no gradient, no optimizer state), e.g. LoRA's base.

Models (a model's call takes a dict of framework tensors, returns a dict with "loss")
    ``forward(model, batch, train=False) -> dict[str, np.ndarray]``.
    ``loss_and_grads(model, batch, train=True) -> (float, dict[str, np.ndarray])``: gradients
    in canonical names and layouts.

Optimizers (realise ``core.OptimizerSpec`` + ``core.ScheduleSpec`` with the numbers of
``core.reference.ReferenceOptimizer``)
    ``make_optimizer(spec, schedule, model) -> Optimizer`` over the model's trainable parameters.
    ``make_array_optimizer(spec, schedule, params: dict[str, np.ndarray]) -> ArrayOptimizer``:
    the same optimizer over free-standing arrays (tests and the optimizer chapter);
    ``.params() -> dict[str, np.ndarray]`` and ``.step(grads: dict[str, np.ndarray])``.
    Both have ``.native`` (the ``torch.optim`` / ``optax`` / ``keras.optimizers`` object),
    ``.state_dict() -> canonical state`` and ``.load_state_dict(state)`` (see
    ``core.optim`` for the canonical state's keys).
    ``train_step(model, optimizer, batch) -> float``: one update in place, returns the loss.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from types import ModuleType

from mlperf_tutor import project
from mlperf_tutor.frameworks import runtime

NAMES = ("torch", "jax", "tf")

# What must be importable for each adapter, and the pip extra that installs it.
_REQUIRES = {"torch": ("torch",), "jax": ("jax", "flax", "optax"), "tf": ("tensorflow", "keras")}

# Three frameworks in one process: triton (CUDA torch's compiler) must load before TensorFlow,
# and neither JAX nor TensorFlow may take the accelerator's memory at start. See runtime.py.
runtime.install_hook()


class FrameworkNotInstalled(ImportError):
    """The requested framework (or one of its libraries) is not installed."""


def check_name(framework: str) -> str:
    """Return ``framework`` if it is known, else raise a ValueError listing the valid names."""
    if framework not in NAMES:
        raise ValueError(f"unknown framework {framework!r}; choose one of {list(NAMES)}")
    return framework


# A comma-separated subset of NAMES: the frameworks the package may use here, whatever else is
# installed (e.g. "torch,jax" to keep TensorFlow out of a process, as on a TPU runtime).
SELECT_VARIABLE = "MLPERF_TUTOR_FRAMEWORKS"


def _selected() -> tuple[str, ...]:
    value = os.environ.get(SELECT_VARIABLE, "").strip()
    if not value:
        return NAMES
    chosen = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in chosen if name not in NAMES]
    if unknown:
        raise ValueError(
            f"{SELECT_VARIABLE}={value!r} names unknown frameworks {unknown}; "
            f"use a comma-separated subset of {list(NAMES)}"
        )
    return chosen


def available(framework: str) -> bool:
    """Whether the framework's libraries can be imported (without importing them) and
    ``MLPERF_TUTOR_FRAMEWORKS``, when set, lets the package use it."""
    check_name(framework)
    if framework not in _selected():
        return False
    return _importable(framework) and not outdated(framework)


def _importable(framework: str) -> bool:
    return all(importlib.util.find_spec(mod) is not None for mod in _REQUIRES[framework])


def outdated(framework: str) -> list[str]:
    """The framework's libraries installed below the minimum the package declares, e.g.
    ``["flax 0.10.0 (needs >=0.12.6)"]`` (Colab's preinstalled versions can be older). Empty
    where the package's own metadata or ``packaging`` is not there to tell."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import InvalidVersion, Version

        declared = importlib.metadata.requires(project.DISTRIBUTION) or []
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return []
    found = []
    for text in declared:
        req = Requirement(text)
        if req.marker is None or not req.marker.evaluate({"extra": framework}):
            continue
        try:
            have = importlib.metadata.version(req.name)
            ok = req.specifier.contains(Version(have), prereleases=True)
        except (importlib.metadata.PackageNotFoundError, InvalidVersion):
            continue  # not installed under this name (tensorflow-cpu), or not comparable
        if not ok:
            found.append(f"{req.name} {have} (needs {req.specifier})")
    return found


def installed() -> list[str]:
    """The frameworks the package can use here, in the order of :data:`NAMES`."""
    return [name for name in NAMES if available(name)]


def install_hint(framework: str) -> str:
    """How to add ``framework``: the pip command, or the variable that keeps it out."""
    check_name(framework)
    if framework not in _selected():
        return f"{SELECT_VARIABLE} leaves it out"
    return f'pip install "{project.requirement((framework,))}"'


def present(framework: str) -> bool:
    """For a notebook cell that needs one framework: True if it is usable here, else print one
    line saying that the cell is skipped and how to add the framework, and return False."""
    if available(framework):
        return True
    print(f"{framework} is not available here, so this cell is skipped ({install_hint(framework)})")
    return False


def get(framework: str) -> ModuleType:
    """The adapter module of ``framework``; imports the framework now."""
    check_name(framework)
    adapter = sys.modules.get(f"{__name__}.{framework}")
    if adapter is not None and framework in _selected() and _importable(framework):
        # Imported already, so its libraries are loaded in this process at the versions they
        # have: reading their versions again (importlib.metadata, 20 ms) would not change the
        # answer, and the workloads call this once per evaluation batch.
        return adapter
    if not available(framework):
        if framework not in _selected():
            raise FrameworkNotInstalled(
                f"framework {framework!r} is left out by "
                f"{SELECT_VARIABLE}={os.environ[SELECT_VARIABLE]!r}"
            )
        missing = [m for m in _REQUIRES[framework] if importlib.util.find_spec(m) is None]
        if not missing:
            raise FrameworkNotInstalled(
                f"framework {framework!r} needs newer versions of {outdated(framework)}; "
                f"run `{install_hint(framework)}` (then restart the Python session)"
            )
        raise FrameworkNotInstalled(
            f"framework {framework!r} needs {missing}, which are not installed; "
            f"run `{install_hint(framework)}`"
        )
    runtime.prepare(framework)
    return importlib.import_module(f"mlperf_tutor.frameworks.{framework}")


def require(what: str, *names: str) -> list[ModuleType]:
    """The adapters of ``names``, for ``what`` (a function's name, for the message), or one
    :class:`FrameworkNotInstalled` sentence naming every missing framework and how to add it."""
    missing = [check_name(name) for name in names if not available(name)]
    if missing:
        how = "; ".join(f"{name}: {install_hint(name)}" for name in missing)
        raise FrameworkNotInstalled(
            f"{what} needs {' and '.join(names)}, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not available here ({how})"
        )
    return [get(name) for name in names]

"""The process around the frameworks: what must happen before the first import of each.

Three frameworks in one process (the book's chapters, a Colab runtime) meet two problems that
one framework alone never shows:

* **TensorFlow and triton.** TensorFlow's shared libraries and triton's ``libtriton`` both carry
  LLVM and register the same LLVM command-line options. Whichever loads second aborts the
  process: with triton 3.9.0 ``import tensorflow; import triton`` ends in ``LLVM ERROR:
  inconsistency in registered CommandLine options`` (a segfault with 3.8.0). Triton arrives with
  CUDA builds of PyTorch, and ``torch._dynamo`` imports it when the first ``torch.optim``
  optimizer is built, so "TensorFlow first, then a torch optimizer" kills a notebook kernel.
  Loaded in the other order the two coexist, so triton (when installed) is loaded before
  TensorFlow: by :func:`prepare`, which every adapter runs before its framework's import, and by
  an import hook (:func:`install_hook`, installed when :mod:`mlperf_tutor.frameworks` is
  imported) that does the same for a plain ``import tensorflow`` in a notebook. Where TensorFlow
  was imported before the package could act, triton is kept out of the process instead (torch
  then runs without triton: no ``torch.compile`` GPU kernels), with a warning saying so.
* **Memory.** JAX takes 75 % of an accelerator's memory at start and TensorFlow all of it, which
  leaves nothing to the next framework. :data:`ENVIRONMENT` makes both allocate on demand; it is
  set (where the user has not set it) before any framework is imported, since each reads it once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

# Read once by each framework at its first import; a value the user set wins.
ENVIRONMENT = {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",  # JAX: allocate on demand, not 75 % at start
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",  # TensorFlow: grow, do not take the whole GPU
}


def _tensorflow_loaded() -> bool:
    return "tensorflow" in sys.modules


def load_triton_first() -> None:
    """Load triton, when installed, while TensorFlow is not loaded yet; if TensorFlow already is,
    keep triton out of this process (a later load would abort it) and warn once."""
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    if not _tensorflow_loaded():
        try:
            importlib.import_module("triton")
        except Exception:  # a broken triton must not break TensorFlow's import; torch reports it
            sys.modules.pop("triton", None)
        return
    # importlib's convention for "not importable": `import triton` raises ImportError and
    # importlib.util.find_spec("triton") returns None, which is how torch asks.
    sys.modules["triton"] = None
    warnings.warn(
        "TensorFlow was imported before mlperf_tutor, and triton cannot be loaded after it "
        "(both carry LLVM; the process would abort), so torch runs without triton in this "
        "process; import mlperf_tutor before tensorflow to have both",
        RuntimeWarning,
        stacklevel=3,
    )


def prepare(framework: str) -> None:
    """What must precede the first import of ``framework``: the memory environment of every
    framework, and triton ahead of TensorFlow. Idempotent and cheap after the first call."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if framework in ("torch", "tf"):
        load_triton_first()


class _TritonBeforeTensorFlow(importlib.abc.MetaPathFinder):
    """Loads triton when TensorFlow is looked up for import, then lets the usual finders find
    TensorFlow (this finder never returns a spec)."""

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" and not _tensorflow_loaded():
            prepare("tf")
        return None


def install_hook() -> None:
    """Put the triton-before-TensorFlow finder at the front of ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _TritonBeforeTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, _TritonBeforeTensorFlow())

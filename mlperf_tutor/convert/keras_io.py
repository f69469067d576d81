"""Keras ``.weights.h5`` files, through the workload's TensorFlow model.

A ``.weights.h5`` file stores variables by Keras layer path in Keras layouts, not by canonical
name, so reading or writing one needs the model: we build the workload's TF model, and let the TF
adapter translate between its variables and the canonical tree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mlperf_tutor.convert.formats import atomic_file
from mlperf_tutor.core.checkpoint import CheckpointError, Tree


def require_workload(path: Path, workload, cfg) -> None:
    """Raise a CheckpointError unless both ``workload`` and ``cfg`` are given."""
    if workload is None or cfg is None:
        raise CheckpointError(
            f"{path}: a .weights.h5 file holds Keras variables by layer, not by name, so reading "
            "or writing it needs the workload and its preset; pass workload= and cfg= "
            "(CLI: mlperf-tutor convert WORKLOAD ... --preset PRESET)"
        )


def load_keras(path: str | os.PathLike, workload, cfg) -> Tree:
    """The canonical tree stored in a ``.weights.h5`` file of ``workload``'s TF model.

    Args:
        path: the ``.weights.h5`` file.
        workload: a :class:`~mlperf_tutor.workloads.base.Workload`.
        cfg: the preset's config the file was saved with.

    Raises:
        CheckpointError: no workload/cfg, a missing or corrupt file, or weights that do not fit
            the model built from ``cfg``.
    """
    import h5py

    path = Path(path)
    require_workload(path, workload, cfg)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; check the path")
    if not h5py.is_hdf5(path):
        raise CheckpointError(
            f"{path} is not an HDF5 file (empty, truncated or corrupt); re-save or re-download it"
        )
    from mlperf_tutor import frameworks

    model = workload.build("tf", cfg)
    try:
        model.load_weights(str(path))
    except Exception as e:  # keras and h5py raise ValueError, KeyError, OSError, ...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} cannot be loaded into the {workload.name} TF model ({type(e).__name__}: "
            f"{first}); check that it was saved from the same workload and preset, or is intact"
        ) from e
    return frameworks.get("tf").to_canonical(model)


def save_keras(tree: Mapping[str, np.ndarray], path: str | os.PathLike, workload, cfg) -> None:
    """Write ``tree`` atomically as ``workload``'s TF model's ``.weights.h5`` file.

    Raises:
        CheckpointError: no workload/cfg, or a tree that does not fit the model (every
            offending key named; nothing written).
    """
    path = Path(path)
    require_workload(path, workload, cfg)
    model = workload.build("tf", cfg, weights=dict(tree))
    with atomic_file(path) as tmp:
        model.save_weights(str(tmp))

"""Keras ``.weights.h5`` files, through the workload's TensorFlow model.

A ``.weights.h5`` file stores variables by Keras layer path in Keras layouts, not by canonical
name, so reading or writing one needs the model: the workload builds its TF model and translates
between its variables and the canonical tree
(:meth:`~mlperf_tutor.core.interop.CheckpointOwner.read_keras_weights` and
``write_keras_weights``). This module owns what is the same for every workload: the file must
exist and be HDF5, a failure is one error naming the file, and a write is atomic.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mlperf_tutor.core.checkpoint import CheckpointError, Tree
from mlperf_tutor.core.config import Config
from mlperf_tutor.core.interop import CheckpointOwner
from mlperf_tutor.core.io import atomic_file


def require_owner(
    path: str | os.PathLike, owner: CheckpointOwner | None, cfg: Config | None
) -> None:
    """Raise a CheckpointError unless both ``owner`` (the workload) and ``cfg`` are given."""
    if owner is None or cfg is None:
        raise CheckpointError(
            f"{path}: a .weights.h5 file holds Keras variables by layer, not by name, so reading "
            "or writing it needs the workload and its preset; pass workload= and cfg= "
            "(CLI: mlperf-tutor convert WORKLOAD ... --preset PRESET)"
        )


def load_keras(path: str | os.PathLike, owner: CheckpointOwner | None, cfg: Config | None) -> Tree:
    """The canonical tree stored in a ``.weights.h5`` file of ``owner``'s TF model.

    Args:
        path: the ``.weights.h5`` file.
        owner: the workload whose TF model wrote the file.
        cfg: the preset's config the file was saved with.

    Raises:
        CheckpointError: no workload/cfg, a missing or corrupt file, or weights that do not fit
            the model built from ``cfg``.
    """
    import h5py

    path = Path(path)
    require_owner(path, owner, cfg)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; check the path")
    if not h5py.is_hdf5(path):
        raise CheckpointError(
            f"{path} is not an HDF5 file (empty, truncated or corrupt); re-save or re-download it"
        )
    try:
        return owner.read_keras_weights(path, cfg)
    except (CheckpointError, ImportError):
        raise  # already says what to do (a missing TensorFlow names the extra to install)
    except Exception as e:  # keras and h5py raise ValueError, KeyError, OSError, ...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} cannot be loaded into the {owner.name} TF model ({type(e).__name__}: "
            f"{first}); check that it was saved from the same workload and preset, or is intact"
        ) from e


def save_keras(
    tree: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    owner: CheckpointOwner | None,
    cfg: Config | None,
) -> None:
    """Write ``tree`` atomically as ``owner``'s TF model's ``.weights.h5`` file.

    Raises:
        CheckpointError: no workload/cfg, or a tree that does not fit the model (every
            offending key named; nothing written).
    """
    path = Path(path)
    require_owner(path, owner, cfg)
    with atomic_file(path) as tmp:
        owner.write_keras_weights(tree, tmp, cfg)

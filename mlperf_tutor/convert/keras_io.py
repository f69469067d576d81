"""Keras ``.weights.h5`` files, through the workload's TensorFlow model.

A ``.weights.h5`` file stores variables by Keras layer path in Keras layouts, not by canonical
name, so reading or writing one needs the model: the workload builds its TF model and translates
between its variables and the canonical tree
(:meth:`~mlperf_tutor.core.interop.CheckpointOwner.read_keras_weights` and
``write_keras_weights``). This module owns what is the same for every workload: the file must
exist and be a regular HDF5 file holding nothing but groups and plain datasets (no external
storage, virtual dataset, soft or external link: each would make Keras read bytes from
elsewhere), a failure is one error naming the file, and a write is atomic.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mlperf_tutor.core.checkpoint import CheckpointError, Tree
from mlperf_tutor.core.config import Config
from mlperf_tutor.core.files import regular_file
from mlperf_tutor.core.interop import CheckpointOwner
from mlperf_tutor.core.io import atomic_file

# Keras nests a few groups per layer; a deeper file is hostile (hard links can make a cycle).
MAX_DEPTH = 64


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
    path = Path(path)
    require_owner(path, owner, cfg)
    regular_file(path, CheckpointError, "Keras weights file")
    check_h5(path)
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


def check_h5(path: Path) -> None:
    """Refuse an HDF5 file whose datasets or links reach outside it, or which h5py cannot walk.

    Raises:
        CheckpointError: naming the file and the offending object: not HDF5, a soft or
            external link, a dataset with external storage or a virtual dataset, a dataset of
            a non-numeric type, nesting deeper than :data:`MAX_DEPTH`, or a file h5py fails to
            read.
    """
    import h5py

    def walk(group, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{path}: {group.name} is nested deeper than {MAX_DEPTH}")
        for name in group:
            link = group.get(name, getlink=True)
            where = f"{group.name.rstrip('/')}/{name}"
            if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                raise CheckpointError(
                    f"{path}: {where} is a {type(link).__name__}; a weights file holds its own "
                    "datasets only, links are refused"
                )
            item = group[name]
            if isinstance(item, h5py.Group):
                walk(item, depth + 1)
            elif not isinstance(item, h5py.Dataset):
                raise CheckpointError(f"{path}: {where} is not a group or dataset")
            elif item.external or item.is_virtual:
                what = "virtual" if item.is_virtual else "stored in an external file"
                raise CheckpointError(
                    f"{path}: dataset {where} is {what}; only data inside the file is read"
                )
            elif item.dtype.kind not in "biuf":
                raise CheckpointError(
                    f"{path}: dataset {where} has dtype {item.dtype}, not a number type"
                )

    try:
        if not h5py.is_hdf5(path):
            raise CheckpointError(
                f"{path} is not an HDF5 file (empty, truncated or corrupt); re-save or "
                "re-download it"
            )
        with h5py.File(path, "r") as f:
            walk(f, 0)
    except CheckpointError:
        raise
    except Exception as e:  # h5py raises OSError, KeyError, ValueError, RuntimeError...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} is a damaged HDF5 file ({type(e).__name__}: {first}); re-save or "
            "re-download it"
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

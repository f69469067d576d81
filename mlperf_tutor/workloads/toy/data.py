"""Toy data on disk: one ``.npy`` file per batch key, the whole dataset's rows in each.

The toy workload is no MLPerf benchmark and has no reference format, so it takes the plainest
one: a directory holding

==============  ===============  =======  =========================================
file            shape            dtype    meaning
==============  ===============  =======  =========================================
``image.npy``   (N, C, H, W)     float32  images, NCHW as in the batch
``tokens.npy``  (N, T)           int32    token ids in [0, vocab_size)
``labels.npy``  (N,)             int32    classes in [0, num_classes)
==============  ===============  =======  =========================================

written by ``np.save`` and read by ``np.load(allow_pickle=False, mmap_mode="r")``: no pickle,
and rows are read from the mapped files only when a batch needs them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mlperf_tutor.core.files import NPY_HEADER_ERRORS, regular_file

# name -> (dtype, the row's dimensions as config fields); in synthetic_batch's key order.
LAYOUT = {
    "image": (np.dtype(np.float32), ("in_channels", "image_size", "image_size")),
    "tokens": (np.dtype(np.int32), ("seq_len",)),
    "labels": (np.dtype(np.int32), ()),
}
# The range of the integer files' values, as a config field: [0, cfg.<field>).
LIMITS = {"tokens": "vocab_size", "labels": "num_classes"}


class ToyDataError(ValueError):
    """A toy data directory that cannot be read (the message names the file)."""


def _reason(error: BaseException) -> str:
    """A library's exception as one line of an error message (theirs can hold newlines)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def write_arrays(directory: str | os.PathLike, batch: Mapping[str, np.ndarray]) -> Path:
    """Write ``batch`` (a ``synthetic_batch``) as ``directory/{image,tokens,labels}.npy``, each
    file atomically, in :data:`LAYOUT`'s dtypes; returns ``directory``."""
    from mlperf_tutor.core.io import atomic_file

    directory = Path(directory)
    for name, (dtype, _) in LAYOUT.items():
        values = np.asarray(batch[name])
        if dtype.kind == "i" and not np.array_equal(values.astype(dtype), values):
            raise ToyDataError(f"cannot write {directory / name}.npy: values do not fit {dtype}")
    for name, (dtype, _) in LAYOUT.items():
        with atomic_file(directory / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(batch[name]).astype(dtype), allow_pickle=False)
    return directory


class ToyArrays:
    """The toy data directory of :func:`write_arrays`, memory-mapped and checked on opening.

    Args:
        directory: the folder holding ``image.npy``, ``tokens.npy`` and ``labels.npy``.
        cfg: a ``ToyConfig``: the rows' shapes and the integer files' ranges.
        validate: check every value on opening (one pass over each file): tokens and labels
            in their ranges, images finite. ``False`` skips it, to open trusted data faster.

    Raises:
        ToyDataError: a missing or non-regular file, a file that is not a .npy array (or is
            truncated), a wrong dtype or shape, files of different row counts, or a value out
            of its range or not finite (the message names the file and the row).
    """

    def __init__(self, directory: str | os.PathLike, cfg, *, validate: bool = True):
        self.directory, self.validate = Path(directory), validate
        if not self.directory.is_dir():
            raise ToyDataError(
                f"{self.directory} is not a directory; pass the folder holding "
                f"{', '.join(f'{n}.npy' for n in LAYOUT)}"
            )
        self.arrays = {name: self._open(name, cfg) for name in LAYOUT}
        rows = {f"{name}.npy": len(a) for name, a in self.arrays.items()}
        if len(set(rows.values())) > 1:
            raise ToyDataError(
                f"{self.directory} has files of different row counts ({rows}); each row is one "
                "sample across the three files"
            )

    def _open(self, name: str, cfg) -> np.ndarray:
        path = regular_file(self.directory / f"{name}.npy", ToyDataError, "toy data file")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (*NPY_HEADER_ERRORS, OSError, EOFError) as e:
            raise ToyDataError(
                f"{path} is not a readable .npy array ({_reason(e)}); write it again"
            ) from None
        dtype, fields = LAYOUT[name]
        row = tuple(getattr(cfg, f) for f in fields)
        if array.dtype != dtype or array.shape[1:] != row:
            want = "(N" + "".join(f", {d}" for d in row) + (",)" if not row else ")")
            raise ToyDataError(
                f"{path} holds {array.dtype} {array.shape}; expected {dtype} {want} for this config"
            )
        if self.validate and name in LIMITS and array.size:
            limit = getattr(cfg, LIMITS[name])
            if array.min() < 0 or array.max() >= limit:
                where = np.argwhere((array < 0) | (array >= limit))[0]
                column = f", column {where[1]}" if len(where) > 1 else ""
                raise ToyDataError(
                    f"{path}: row {where[0]}{column} holds {array[tuple(where)]}, outside "
                    f"[0, {limit}) (cfg.{LIMITS[name]}); use the config the data was made for"
                )
        if self.validate and name not in LIMITS and not np.isfinite(array).all():
            row = int(np.argwhere(~np.isfinite(array))[0][0])
            raise ToyDataError(f"{path}: row {row} holds NaN or infinite values; write it again")
        return array

    def __len__(self) -> int:
        return len(self.arrays["labels"])

    def batch(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """Samples ``rows`` as a batch of :data:`LAYOUT`'s keys (fresh, writable arrays)."""
        rows = np.asarray(rows, np.int64)
        return {name: np.array(array[rows]) for name, array in self.arrays.items()}

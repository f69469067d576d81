"""Checkpoint files: the canonical tree in and out of every format, and between formats.

A canonical checkpoint is a flat ``dict[str, np.ndarray]`` in PyTorch ``state_dict`` names and
layouts (bf16 as ``ml_dtypes.bfloat16``). Formats, chosen from the path (:func:`detect_format`),
each one entry of the table :data:`FORMATS` (``convert/formats.py``: detect, read, write):

==============  ==================================  =========================================
format          path                                notes
==============  ==================================  =========================================
safetensors     ``*.safetensors``                   streamed; ``load`` memory-maps lazily
torch           ``*.pt``, ``*.pth``, ``*.bin``      plain state_dict; ``weights_only`` loads
orbax           any other directory                 the flat dict; streamed a group at a time
keras           ``*.weights.h5``                    needs ``workload`` and ``cfg``: the
                                                    workload's TF model reads and writes it
hf              ``*.hf``, or a directory holding    Hugging Face ``save_pretrained``; needs a
                ``config.json``                     workload whose ``hf`` maps the names (and
                                                    ``cfg`` to write); memory-mapped, written
                                                    whole
==============  ==================================  =========================================

This package knows no workload and imports no framework at import time. Where a format needs the
model, ``workload`` is anything with the small interface of
:class:`~mlperf_tutor.core.interop.CheckpointOwner` (every ``Workload`` is one): its name, its
:class:`~mlperf_tutor.core.interop.HfInterop` (or None), ``canonical_specs``,
``read_keras_weights`` and ``write_keras_weights``. The Hugging Face files themselves are read
and written here (:func:`read_hf_config`, :func:`read_hf_weights`, :func:`write_hf_directory`),
for the workloads' ``hf.py`` to use.

Every write is atomic (a crash leaves the previous file or directory intact) and is validated
first: with ``expected``, a mismatch raises one error naming every bad key, and nothing is written.
:func:`convert` streams when both sides can (safetensors and Orbax), so peak memory stays near the
largest tensor, not the checkpoint size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from mlperf_tutor.convert.formats import ACCEPTED, FORMATS, Format, detect_format
from mlperf_tutor.convert.hf_io import CONFIG as HF_CONFIG
from mlperf_tutor.convert.hf_io import DIFFUSERS_WEIGHTS
from mlperf_tutor.convert.hf_io import check_declared_size as check_hf_declared_size
from mlperf_tutor.convert.hf_io import config_dict as hf_config_dict
from mlperf_tutor.convert.hf_io import read_config as read_hf_config
from mlperf_tutor.convert.hf_io import read_weights as read_hf_weights
from mlperf_tutor.convert.hf_io import write_pretrained as write_hf_directory
from mlperf_tutor.convert.tensors import (
    DTYPES,
    PREFETCH_SLACK,
    Reader,
    TensorSpec,
    prefetch,
    specs_of,
)
from mlperf_tutor.core.checkpoint import CheckpointError, Tree, check_tree
from mlperf_tutor.core.config import Config
from mlperf_tutor.core.interop import CheckpointOwner

Expected = Mapping[str, tuple[tuple[int, ...], str]]

__all__ = [
    "ACCEPTED",
    "CheckpointError",
    "DIFFUSERS_WEIGHTS",
    "DTYPES",
    "FORMATS",
    "Format",
    "HF_CONFIG",
    "TensorSpec",
    "check_hf_declared_size",
    "convert",
    "detect_format",
    "hf_config_dict",
    "iter_tensors",
    "load",
    "read_hf_config",
    "read_hf_weights",
    "save",
    "specs_of",
    "tensor_specs",
    "write_hf_directory",
]


def _open(path: str | os.PathLike, workload: CheckpointOwner | None, cfg: Config | None) -> Reader:
    """An open reader of a checkpoint, in the format of its path."""
    return FORMATS[detect_format(path)].read(path, workload, cfg)


def tensor_specs(
    path: str | os.PathLike, workload: CheckpointOwner | None = None, cfg: Config | None = None
) -> dict[str, TensorSpec]:
    """name -> :class:`TensorSpec` of a checkpoint (safetensors and Orbax: no data is read)."""
    with _open(path, workload, cfg) as source:
        return dict(source.specs)


def iter_tensors(
    path: str | os.PathLike, workload: CheckpointOwner | None = None, cfg: Config | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) of a checkpoint one tensor at a time (streaming where the format can).

    Args:
        path: any checkpoint :func:`detect_format` accepts.
        workload, cfg: needed for ``.weights.h5`` and Hugging Face directories.
    """
    with _open(path, workload, cfg) as source:
        yield from source.tensors()


def load(
    path: str | os.PathLike,
    workload: CheckpointOwner | None = None,
    cfg: Config | None = None,
    expected: Expected | None = None,
) -> Tree:
    """Read a checkpoint as a canonical tree.

    Args:
        path: any checkpoint :func:`detect_format` accepts.
        workload, cfg: the workload and preset config; needed for ``.weights.h5`` and Hugging
            Face directories (whose config.json must then match ``cfg``'s architecture).
        expected: name -> (shape, dtype name); checked before any tensor data is read (for
            safetensors and Orbax).

    Raises:
        CheckpointError: missing, corrupt or unreadable file (names the file and what to do).
        CheckpointMismatch: the checkpoint does not match ``expected`` (every bad key named).
    """
    with _open(path, workload, cfg) as source:
        if expected is not None:
            check_tree(expected, source.specs, where=str(path))
        # Safetensors: lazily memory-mapped, nothing read until used.
        return source.tree()


def save(
    tree: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    workload: CheckpointOwner | None = None,
    cfg: Config | None = None,
    expected: Expected | None = None,
) -> None:
    """Write a canonical tree atomically in the format of ``path``.

    Args:
        tree: name -> numpy array (canonical names, layouts and dtypes).
        path: destination; see :func:`detect_format`.
        workload, cfg: the workload and preset config; needed for ``.weights.h5`` and Hugging
            Face directories (``cfg`` becomes the config.json).
        expected: name -> (shape, dtype name); a mismatch raises before anything is written.

    Raises:
        CheckpointMismatch: ``tree`` does not match ``expected`` (every bad key named).
        CheckpointError: the tree holds something that is not a storable array, or the write
            failed (the previous file is left intact).
    """
    specs = specs_of(tree, str(path))
    if expected is not None:
        check_tree(expected, tree, where=f"the tree for {path}")
    FORMATS[detect_format(path)].write(path, specs, iter(tree.items()), workload, cfg)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    workload: CheckpointOwner | None = None,
    cfg: Config | None = None,
    expected: Expected | None = None,
    progress: bool = False,
) -> None:
    """Move a checkpoint between any two formats, tensor by tensor where both sides allow.

    Args:
        src: source checkpoint; its format comes from the path.
        dst: destination; written atomically, its format comes from the path.
        workload, cfg: the workload and preset config; needed when either side is
            ``.weights.h5`` or a Hugging Face directory. With both, the source must be a
            checkpoint of that model: it is checked against ``workload.canonical_specs(cfg)``
            (names, shapes and dtypes) unless ``expected`` says otherwise.
        expected: name -> (shape, dtype name); the source is checked against it before
            anything is written.
        progress: show a tqdm bar over the bytes converted.

    Raises:
        CheckpointError: unreadable source or failed write (``dst`` is left as it was).
        CheckpointMismatch: the source does not match ``expected``.
    """
    # A destination that cannot work fails before the source is read.
    dst_format = FORMATS[detect_format(dst)]
    dst_format.check_write(dst, workload, cfg)
    if expected is None and workload is not None and cfg is not None:
        expected = workload.canonical_specs(cfg)
    with _open(src, workload, cfg) as source:
        if expected is not None:
            check_tree(expected, source.specs, where=str(src))
        tensors = source.tensors()
        if source.streams and source.specs:
            # Read ahead within half the largest tensor (plus slack): overlap without breaking
            # the bound of ~1.5x the largest tensor.
            largest = max(s.nbytes for s in source.specs.values())
            tensors = prefetch(tensors, source.costs(), largest // 2 + PREFETCH_SLACK)
        if progress:
            tensors = _with_progress(tensors, source.specs, f"{Path(src).name} -> {Path(dst).name}")
        dst_format.write(dst, source.specs, tensors, workload, cfg)


def _with_progress(
    tensors: Iterator[tuple[str, np.ndarray]], specs: Mapping[str, TensorSpec], desc: str
) -> Iterator[tuple[str, np.ndarray]]:
    from tqdm.auto import tqdm

    total = sum(s.nbytes for s in specs.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
        for name, array in tensors:
            yield name, array
            bar.update(specs[name].nbytes)
            del array  # not held while the next one is read

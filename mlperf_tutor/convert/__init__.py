"""Checkpoint files: the canonical tree in and out of every format, and between formats.

A canonical checkpoint is a flat ``dict[str, np.ndarray]`` in PyTorch ``state_dict`` names and
layouts (bf16 as ``ml_dtypes.bfloat16``). Formats, chosen from the path (:func:`detect_format`):

==============  ==================================  =========================================
format          path                                notes
==============  ==================================  =========================================
safetensors     ``*.safetensors``                   streamed; ``load`` memory-maps lazily
torch           ``*.pt``, ``*.pth``, ``*.bin``      plain state_dict; ``weights_only`` loads
orbax           any other directory                 the flat dict; streamed a group at a time
keras           ``*.weights.h5``                    needs ``workload`` and ``cfg`` (TF model)
hf              ``*.hf``, or a directory holding    Hugging Face ``save_pretrained``; needs a
                ``config.json``                     workload with ``hf`` interop (and ``cfg``
                                                    to write); memory-mapped, written whole
==============  ==================================  =========================================

Every write is atomic (a crash leaves the previous file or directory intact) and is validated
first: with ``expected``, a mismatch raises one error naming every bad key, and nothing is written.
:func:`convert` streams when both sides can (safetensors and Orbax), so peak memory stays near the
largest tensor, not the checkpoint size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlperf_tutor.convert import hf_io
from mlperf_tutor.convert.formats import (
    ACCEPTED,
    DTYPES,
    FORMATS,
    PREFETCH_SLACK,
    TensorSpec,
    detect_format,
    group_by_bytes,
    prefetch,
    specs_of,
)
from mlperf_tutor.convert.keras_io import load_keras, require_workload, save_keras
from mlperf_tutor.convert.orbax_io import group_budget, iter_orbax, orbax_specs, write_orbax
from mlperf_tutor.convert.safetensors_io import SafetensorsReader, write_safetensors
from mlperf_tutor.convert.torch_io import load_torch, save_torch
from mlperf_tutor.core.checkpoint import CheckpointError, Tree, check_tree

Expected = Mapping[str, tuple[tuple[int, ...], str]]

__all__ = [
    "ACCEPTED",
    "CheckpointError",
    "DTYPES",
    "FORMATS",
    "TensorSpec",
    "convert",
    "detect_format",
    "iter_tensors",
    "load",
    "save",
    "tensor_specs",
]


class _Source:
    """Specs of a checkpoint (known before any data) and its tensors, one at a time."""

    def __init__(self, path: str | os.PathLike, workload: Any = None, cfg: Any = None):
        self.path, self.format = Path(path), detect_format(path)
        self._tree: dict[str, np.ndarray] | None = None
        self._reader: SafetensorsReader | None = None
        if self.format == "safetensors":
            self._reader = SafetensorsReader(path)
            self.specs = self._reader.specs
        elif self.format == "orbax":
            self.specs = orbax_specs(path)
        elif self.format == "torch":
            # torch and Keras files come whole; their specs need the data.
            self._tree = load_torch(path)
            self.specs = specs_of(self._tree, str(path))
        elif self.format == "hf":
            # Memory-mapped: the specs come without reading data, each tensor when used.
            hf = hf_io.require_hf(path, workload)
            found, self._tree = hf.load_pretrained(path)
            if cfg is not None:
                hf_io.check_architecture(hf, found, cfg, path)
            self.specs = specs_of(self._tree, str(path))
        else:
            self._tree = load_keras(path, workload, cfg)
            self.specs = specs_of(self._tree, str(path))

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) in :attr:`specs` order; each is ours to release after use."""
        if self._reader is not None:
            yield from self._reader
        elif self._tree is not None:
            while self._tree:
                # Popping lets each tensor go as soon as the consumer drops it.
                name = next(iter(self._tree))
                yield name, self._tree.pop(name)
        else:
            yield from iter_orbax(self.path, self.specs)

    def costs(self) -> list[int]:
        """Bytes that producing each tensor of :meth:`tensors` allocates (see ``prefetch``)."""
        if self.format != "orbax":
            return [s.nbytes for s in self.specs.values()]
        # Orbax restores a group at once: its first tensor brings the others along.
        costs = []
        for group in group_by_bytes(self.specs, group_budget(self.specs)):
            costs += [sum(self.specs[k].nbytes for k in group)] + [0] * (len(group) - 1)
        return costs

    def mapped(self) -> dict[str, np.ndarray]:
        """The whole tree, lazily memory-mapped (safetensors only)."""
        assert self._reader is not None
        return self._reader.mapped()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write(
    path: str | os.PathLike,
    specs: Mapping[str, TensorSpec],
    tensors: Iterator[tuple[str, np.ndarray]],
    workload: Any = None,
    cfg: Any = None,
) -> None:
    fmt = detect_format(path)
    if fmt == "safetensors":
        write_safetensors(path, specs, tensors)
    elif fmt == "orbax":
        write_orbax(path, specs, tensors)
    elif fmt == "torch":
        save_torch(dict(tensors), path)
    elif fmt == "hf":
        hf_io.require_hf(path, workload, cfg, need_cfg=True).save_pretrained(
            dict(tensors), cfg, path
        )
    else:
        save_keras(dict(tensors), path, workload, cfg)


def tensor_specs(
    path: str | os.PathLike, workload: Any = None, cfg: Any = None
) -> dict[str, TensorSpec]:
    """name -> :class:`TensorSpec` of a checkpoint (safetensors and Orbax: no data is read)."""
    with _Source(path, workload, cfg) as source:
        return dict(source.specs)


def iter_tensors(
    path: str | os.PathLike, workload: Any = None, cfg: Any = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) of a checkpoint one tensor at a time (streaming where the format can).

    Args:
        path: any checkpoint :func:`detect_format` accepts.
        workload, cfg: needed for ``.weights.h5`` and Hugging Face directories.
    """
    with _Source(path, workload, cfg) as source:
        yield from source.tensors()


def load(
    path: str | os.PathLike, workload: Any = None, cfg: Any = None, expected: Expected | None = None
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
    with _Source(path, workload, cfg) as source:
        if expected is not None:
            check_tree(expected, source.specs, where=str(path))
        if source.format == "safetensors":
            return source.mapped()
        return dict(source.tensors())


def save(
    tree: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    workload: Any = None,
    cfg: Any = None,
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
    _write(path, specs, iter(tree.items()), workload, cfg)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    workload: Any = None,
    cfg: Any = None,
    expected: Expected | None = None,
    progress: bool = False,
) -> None:
    """Move a checkpoint between any two formats, tensor by tensor where both sides allow.

    Args:
        src: source checkpoint; its format comes from the path.
        dst: destination; written atomically, its format comes from the path.
        workload, cfg: the workload and preset config; needed when either side is
            ``.weights.h5`` or a Hugging Face directory.
        expected: name -> (shape, dtype name); the source is checked against it before
            anything is written.
        progress: show a tqdm bar over the bytes converted.

    Raises:
        CheckpointError: unreadable source or failed write (``dst`` is left as it was).
        CheckpointMismatch: the source does not match ``expected``.
    """
    # A destination that cannot work fails before the source is read.
    dst_format = detect_format(dst)
    if dst_format == "keras":
        require_workload(Path(dst), workload, cfg)
    elif dst_format == "hf":
        hf_io.require_hf(dst, workload, cfg, need_cfg=True)
    with _Source(src, workload, cfg) as source:
        if expected is not None:
            check_tree(expected, source.specs, where=str(src))
        tensors = source.tensors()
        if source.format in ("safetensors", "orbax") and source.specs:
            # Read ahead within half the largest tensor (plus slack): overlap without breaking
            # the bound of ~1.5x the largest tensor.
            largest = max(s.nbytes for s in source.specs.values())
            tensors = prefetch(tensors, source.costs(), largest // 2 + PREFETCH_SLACK)
        if progress:
            tensors = _with_progress(tensors, source.specs, f"{Path(src).name} -> {Path(dst).name}")
        _write(dst, source.specs, tensors, workload, cfg)


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

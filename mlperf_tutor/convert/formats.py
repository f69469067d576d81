"""The format table: how each checkpoint format is recognised, read and written.

:data:`FORMATS` maps a format's name to its :class:`Format`; :func:`detect_format` picks one
from the path, and ``convert.load``, ``save`` and ``convert`` go through the table, never through
a chain of cases. A format that needs the workload (Keras ``.weights.h5``, Hugging Face
directories) gets it as a :class:`~mlperf_tutor.core.interop.CheckpointOwner` and the config;
the others ignore both. Adding a format is one entry here and a module of its own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from mlperf_tutor.convert import hf_io, keras_io, orbax_io, safetensors_io, torch_io
from mlperf_tutor.convert.tensors import Reader, TensorSpec, TreeReader
from mlperf_tutor.core.checkpoint import CheckpointError
from mlperf_tutor.core.config import Config
from mlperf_tutor.core.interop import CheckpointOwner

StrPath = str | os.PathLike
Owner = CheckpointOwner | None
Tensors = Iterator[tuple[str, np.ndarray]]


def _nothing_needed(path: StrPath, owner: Owner, cfg: Config | None) -> None:
    """The ``check_write`` of formats that need neither a workload nor a config."""


@dataclasses.dataclass(frozen=True)
class Format:
    """One checkpoint format.

    Attributes:
        detect: ``(path, name) -> bool``: whether ``path`` (its text; ``name``: its last
            component, lower case, without a trailing separator) is of this format. The first
            format of :data:`FORMATS` that accepts a path is its format.
        read: ``(path, owner, cfg) -> Reader``: open a checkpoint (its specs, then its tensors
            one at a time).
        write: ``(path, specs, tensors, owner, cfg)``: write the tensors, which arrive in
            ``specs`` order, atomically.
        check_write: ``(path, owner, cfg)``: raise a CheckpointError when writing ``path``
            cannot work (a missing workload or config), before any source is read.
    """

    detect: Callable[[str, str], bool]
    read: Callable[[StrPath, Owner, Config | None], Reader]
    write: Callable[[StrPath, Mapping[str, TensorSpec], Tensors, Owner, Config | None], None]
    check_write: Callable[[StrPath, Owner, Config | None], None] = _nothing_needed


# In detection order: Hugging Face before Orbax, which takes any other directory (an existing
# one, or a new path that ends in a separator or has no extension).
FORMATS: dict[str, Format] = {
    "hf": Format(
        detect=hf_io.detect,
        read=lambda path, owner, cfg: TreeReader(hf_io.load_hf(path, owner, cfg), str(path)),
        write=lambda path, specs, tensors, owner, cfg: hf_io.save_hf(
            dict(tensors), path, owner, cfg
        ),
        check_write=lambda path, owner, cfg: hf_io.require_hf(path, owner, cfg, need_cfg=True),
    ),
    "orbax": Format(
        detect=orbax_io.detect,
        read=lambda path, owner, cfg: orbax_io.OrbaxReader(path),
        write=lambda path, specs, tensors, owner, cfg: orbax_io.write_orbax(path, specs, tensors),
    ),
    "safetensors": Format(
        detect=lambda path, name: name.endswith(".safetensors"),
        read=lambda path, owner, cfg: safetensors_io.SafetensorsReader(path),
        write=lambda path, specs, tensors, owner, cfg: safetensors_io.write_safetensors(
            path, specs, tensors
        ),
    ),
    "torch": Format(
        detect=lambda path, name: name.endswith((".pt", ".pth", ".bin")),
        read=lambda path, owner, cfg: TreeReader(torch_io.load_torch(path), str(path)),
        write=lambda path, specs, tensors, owner, cfg: torch_io.save_torch(dict(tensors), path),
    ),
    "keras": Format(
        detect=lambda path, name: name.endswith(".weights.h5"),
        read=lambda path, owner, cfg: TreeReader(keras_io.load_keras(path, owner, cfg), str(path)),
        write=lambda path, specs, tensors, owner, cfg: keras_io.save_keras(
            dict(tensors), path, owner, cfg
        ),
        check_write=keras_io.require_owner,
    ),
}

ACCEPTED = (
    "'.safetensors', '.pt'/'.pth'/'.bin' (PyTorch state_dict), '.weights.h5' (Keras), "
    "a Hugging Face save_pretrained directory (one holding config.json, or a path ending in "
    "'.hf'), or a directory (Orbax checkpoint; a new one is a path without extension or ending "
    "in '/')"
)


def detect_format(path: str | os.PathLike) -> str:
    """The checkpoint format of ``path``, from its extension or from being a directory.

    A Hugging Face ``save_pretrained`` directory ("hf") is an existing directory holding one of
    its files (``hf_io.MARKERS``), or any path whose name ends in ``.hf`` (how a new one is
    named); any other directory is an Orbax checkpoint.

    Returns:
        A name of :data:`FORMATS`: "safetensors", "torch", "keras", "orbax" or "hf".

    Raises:
        CheckpointError: (a ValueError) the path is none of the accepted forms; the message
            lists them.
    """
    text = os.fspath(path)
    name = os.path.basename(text.rstrip("/" + os.sep)).lower()
    for fmt, spec in FORMATS.items():
        if spec.detect(text, name):
            return fmt
    raise CheckpointError(f"cannot tell the checkpoint format of {text!r}; use {ACCEPTED}")

"""PyTorch ``.pt`` / ``.pth`` / ``.bin`` files holding a plain ``state_dict``.

Reading uses ``torch.load(weights_only=True)`` only: a pickle is code, and a checkpoint that needs
more than tensors in a dict is refused rather than executed. Files are memory-mapped where torch
allows it, so tensors are read as they are used. torch does not check the CRC-32 that its zip
archive stores for every record, so a damaged file would load as different weights: the
checksums are verified first (one read of the whole file). torch is imported inside the
functions so that ``mlperf_tutor.convert`` imports no framework.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from mlperf_tutor.convert.tensors import native
from mlperf_tutor.core.checkpoint import CheckpointError, Tree
from mlperf_tutor.core.files import regular_file
from mlperf_tutor.core.io import atomic_file

_RESAVE = (
    "re-save it as a plain state_dict with torch.save({k: v for k, v in "
    "model.state_dict().items()}, path) in an environment you trust"
)


def _reduced_dtypes():
    import torch

    # numpy has no bf16/fp8: these cross through an integer view of the same bits.
    return {
        torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16)),
        torch.float8_e4m3fn: (torch.uint8, np.dtype(ml_dtypes.float8_e4m3fn)),
        torch.float8_e5m2: (torch.uint8, np.dtype(ml_dtypes.float8_e5m2)),
    }


def tensor_to_numpy(tensor, name: str = "tensor", where: str = "checkpoint") -> np.ndarray:
    """A CPU torch tensor as a numpy array with the same bits (bf16 stays bf16)."""
    tensor = tensor.detach().cpu().contiguous()
    reduced = _reduced_dtypes()
    try:
        if tensor.dtype in reduced:
            int_dtype, np_dtype = reduced[tensor.dtype]
            return tensor.view(int_dtype).numpy().view(np_dtype)
        return tensor.numpy()
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"{where}: {name!r} has dtype {tensor.dtype}, which a canonical checkpoint cannot hold"
        ) from e


def numpy_to_tensor(array: np.ndarray):
    """A numpy array as a torch tensor with the same bits (sharing memory when possible)."""
    import torch

    array = native(array)
    if not array.flags.writeable:
        # torch.from_numpy warns on read-only memory; a copy keeps the caller's array safe.
        array = array.copy()
    for torch_dtype, (int_dtype, np_dtype) in _reduced_dtypes().items():
        if array.dtype == np_dtype:
            int_np = np.int16 if int_dtype == torch.int16 else np.uint8
            return torch.from_numpy(array.view(int_np)).view(torch_dtype)
    return torch.from_numpy(array)


def _reason(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception from inside torch or zipfile."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


# What torch.save's zip archives start with (torch tells them from older files the same way).
_ZIP_MAGIC = b"PK\x03\x04"


def check_archive(path: Path) -> None:
    """Verify the CRC-32 of every record of a zip-format ``.pt`` file (older, non-zip files
    carry no checksum and pass unchecked).

    Raises:
        CheckpointError: the archive is unreadable or a record's bytes do not match its CRC.
    """
    with open(path, "rb") as f:
        if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as e:  # BadZipFile, EOFError, ValueError, NotImplementedError, zlib.error...
        raise CheckpointError(
            f"{path} is a damaged zip archive ({_reason(e)}); re-save or re-download it"
        ) from e
    if bad is not None:
        raise CheckpointError(
            f"{path}: record {bad!r} does not match its CRC-32 checksum; the file is damaged, "
            "re-save or re-download it"
        )


def load_torch(path: str | os.PathLike) -> Tree:
    """Read a plain ``state_dict`` (str -> tensor) with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing or not a regular file, damaged (a zip checksum
            does not match), corrupt, needs more than ``weights_only`` allows, or holds
            anything but tensors in a flat dict.
    """
    import torch

    path = regular_file(path, CheckpointError, "PyTorch checkpoint")
    check_archive(path)
    try:
        try:
            # Memory-mapped, tensors are read only when used: a checkpoint larger than memory
            # can still be converted tensor by tensor.
            obj = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError:
            # Files from torch < 1.6 (not zip) cannot be mapped; damaged ones fail again below.
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{path} is not a plain state_dict: it pickles the Python object "
                f"{found.group(1)}, which torch.load(weights_only=True) refuses to run; {_RESAVE}"
            ) from e
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint that torch.load(weights_only=True) can read "
            f"(corrupt, or not written by torch.save); {_RESAVE}"
        ) from e
    except Exception as e:  # garbage bytes fail anywhere in the unpickler (IndexError, ...)
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (empty, truncated or corrupt: "
            f"{_reason(e)}); re-save or re-download it"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors); {_RESAVE}"
        )
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise CheckpointError(
            f"{path} is not a plain state_dict: entries {bad} are not name -> tensor (a training "
            f"checkpoint with a nested 'model'/'optimizer' dict?); {_RESAVE}"
        )
    return {k: tensor_to_numpy(v, k, str(path)) for k, v in obj.items()}


def save_torch(tree: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write ``tree`` atomically with ``torch.save`` as a dict of tensors."""
    import torch

    state = {k: numpy_to_tensor(v) for k, v in tree.items()}
    with atomic_file(path) as tmp:
        torch.save(state, tmp)

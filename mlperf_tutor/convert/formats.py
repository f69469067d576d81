"""What every format shares: format detection, tensor specs, dtypes, atomic writes.

Writes are atomic: a file is written under a hidden temporary name in the destination's
directory, flushed and fsynced, then ``os.replace``-d over the destination; a directory is built
in a hidden staging directory beside the destination and renamed into place once complete. A
failure at any point removes the temporary and leaves the previous destination as it was.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from mlperf_tutor.core.checkpoint import CheckpointError

FORMATS = ("safetensors", "torch", "orbax", "keras", "hf")

ACCEPTED = (
    "'.safetensors', '.pt'/'.pth'/'.bin' (PyTorch state_dict), '.weights.h5' (Keras), "
    "a Hugging Face save_pretrained directory (one holding config.json, or a path ending in "
    "'.hf'), or a directory (Orbax checkpoint; a new one is a path without extension or ending "
    "in '/')"
)

# Every dtype a canonical tree may hold: the dtypes every format stores bit-exactly.
DTYPES = tuple(
    np.dtype(d)
    for d in (
        np.float64, np.float32, np.float16, ml_dtypes.bfloat16,
        ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
        np.int64, np.int32, np.int16, np.int8,
        np.uint64, np.uint32, np.uint16, np.uint8, np.bool_,
    )
)  # fmt: skip

# Files inside an Orbax checkpoint directory (v0 or v1 layout, top level or one level down).
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "orbax.checkpoint")

# Files that make an existing directory a Hugging Face ``save_pretrained`` one. The weight files
# count too, so that a directory whose config.json went missing is reported as such rather than
# as a broken Orbax checkpoint.
HF_MARKERS = (
    "config.json", "model.safetensors", "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
)  # fmt: skip


class TensorSpec(NamedTuple):
    """Shape and dtype of one tensor, known before its bytes are read."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def detect_format(path: str | os.PathLike) -> str:
    """The checkpoint format of ``path``, from its extension or from being a directory.

    A Hugging Face ``save_pretrained`` directory ("hf") is an existing directory holding one of
    :data:`HF_MARKERS`, or any path whose name ends in ``.hf`` (how a new one is named); any
    other directory is an Orbax checkpoint.

    Returns:
        "safetensors", "torch", "keras", "orbax" or "hf".

    Raises:
        ValueError: the path is none of the accepted forms; the message lists them.
    """
    text = os.fspath(path)
    name = os.path.basename(text.rstrip("/" + os.sep)).lower()
    if name.endswith(".hf"):
        return "hf"
    if os.path.isdir(text):
        return "hf" if any(os.path.isfile(os.path.join(text, m)) for m in HF_MARKERS) else "orbax"
    if text.endswith(("/", os.sep)):
        return "orbax"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith((".pt", ".pth", ".bin")):
        return "torch"
    if name.endswith(".weights.h5"):
        return "keras"
    if name and "." not in name and not os.path.exists(text):
        return "orbax"
    raise ValueError(f"cannot tell the checkpoint format of {text!r}; use {ACCEPTED}")


def specs_of(tree: Mapping[str, np.ndarray], where: str) -> dict[str, TensorSpec]:
    """Specs of a canonical tree, after checking that it holds only storable numpy arrays.

    Raises:
        CheckpointError: a key is not a string, a value is not a numpy array, or a dtype is not
            one of :data:`DTYPES`; every offending key is named.
    """
    bad = []
    for key, value in tree.items():
        if not isinstance(key, str):
            bad.append(f"{key!r}: key is not a string")
        elif not isinstance(value, np.ndarray):
            bad.append(f"{key}: {type(value).__name__} is not a numpy array")
        elif np.dtype(value.dtype) not in DTYPES:
            bad.append(f"{key}: dtype {value.dtype} cannot be stored")
    if bad:
        raise CheckpointError(
            f"cannot write {where}: {'; '.join(bad)}; a canonical tree maps names to numpy arrays "
            f"of dtypes {[d.name for d in DTYPES]} (use the adapter's to_canonical)"
        )
    return {k: TensorSpec(tuple(v.shape), np.dtype(v.dtype)) for k, v in tree.items()}


def native(array: np.ndarray) -> np.ndarray:
    """``array`` C-contiguous in native byte order (how every format lays out raw bytes)."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
    return array if array.flags.c_contiguous else array.copy(order="C")


def group_by_bytes(specs: Mapping[str, TensorSpec], budget: int) -> list[list[str]]:
    """Consecutive names in groups of at most ``budget`` bytes (a larger tensor goes alone)."""
    groups: list[list[str]] = []
    size = budget + 1  # "the current group is full": the first name opens a group
    for name, spec in specs.items():
        if size + spec.nbytes > budget:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += spec.nbytes
    return groups


_END = object()

# Memory a prefetch may hold beyond half the largest tensor (see ``prefetch``).
PREFETCH_SLACK = 128 * 2**20


def prefetch(
    items: Iterable[tuple[str, np.ndarray]], costs: Iterable[int], ahead: int
) -> Iterator[tuple[str, np.ndarray]]:
    """``items``, produced in a background thread ahead of the consumer within a byte budget.

    Reading the next tensor overlaps with writing the current one. The producer reads an item
    early only while the items read but not yet taken cost at most ``ahead`` bytes; a costlier
    item waits until the consumer asks for it, so the consumer's current item plus ``ahead``
    bounds the memory. Consumers must drop their previous item before asking for the next
    (``del array`` at the end of the loop body), or a synchronous read would hold two as well.
    Errors of the producer are raised in the consumer.

    Args:
        items: (name, array) pairs.
        costs: bytes that producing each item allocates, in the same order (0 for an item that
            arrived with an earlier one, as the later tensors of an Orbax group do).
        ahead: the budget for items read early.
    """
    cond = threading.Condition()
    queue: collections.deque = collections.deque()
    state = {"queued": 0, "wanted": False, "stop": False}

    def may_read(cost: int) -> bool:
        early = state["queued"] + cost <= ahead
        return state["stop"] or early or (state["wanted"] and not queue)

    def produce() -> None:
        source = iter(items)
        try:
            for cost in costs:
                with cond:
                    cond.wait_for(lambda c=cost: may_read(c))
                    if state["stop"]:
                        return
                item = next(source, _END)  # the read itself runs outside the lock
                if item is _END:
                    break
                with cond:
                    queue.append((item, cost))
                    state["queued"] += cost
                    cond.notify_all()
                del item
            item = (_END, 0)
        except BaseException as e:  # handed to the consumer, which re-raises it
            item = (e, 0)
        with cond:
            queue.append(item)
            cond.notify_all()

    thread = threading.Thread(target=produce, name="checkpoint-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            with cond:
                state["wanted"] = True
                cond.notify_all()
                cond.wait_for(lambda: queue)
                item, cost = queue.popleft()
                state["queued"] -= cost
                state["wanted"] = False
                cond.notify_all()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            item = None  # the consumer holds it now; waiting for the next must not
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        thread.join()


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory entry is; not every platform allows it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _parent_of(path: Path) -> Path:
    parent = path.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {parent} does not exist; create it")
    return parent


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and replace ``path`` with it.

    The temporary name keeps the destination's name as its suffix, because some writers
    (Keras ``save_weights``) insist on the extension.
    """
    path = Path(path)
    parent = _parent_of(path)
    tmp = parent / f".tmp-{secrets.token_hex(4)}-{path.name}"
    # Not mkstemp: its 0600 mode would stick to the result; this one follows the umask.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(parent)
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e}; nothing was written") from e
    finally:
        tmp.unlink(missing_ok=True)


def is_replaceable_dir(path: Path) -> bool:
    """Whether ``path`` is absent, empty, or an Orbax checkpoint (safe to replace)."""
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    if not entries:
        return True
    names = {e.name for e in entries}
    if names & set(_ORBAX_MARKERS):
        return True
    return any(e.is_dir() and (e / "_METADATA").exists() for e in entries)


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike,
    replaceable: Callable[[Path], bool] = is_replaceable_dir,
    kind: str = "an Orbax checkpoint",
) -> Iterator[Path]:
    """Yield a not-yet-existing directory path in a staging area; on success move it to ``path``.

    An existing ``path`` is replaced only after the new directory is complete, and only if
    ``replaceable(path)`` says it is absent, empty or a directory of the same ``kind``, so a
    mistyped path never deletes unrelated files.

    Args:
        path: the destination directory.
        replaceable: whether an existing ``path`` may be replaced.
        kind: what is written, for the refusal message.
    """
    path = Path(os.fspath(path).rstrip("/" + os.sep))
    parent = _parent_of(path)
    if not replaceable(path):
        raise CheckpointError(
            f"refusing to write {kind} to {path}: it exists and is not {kind}; choose a new "
            "path or remove it first"
        )
    # Everything the writer leaves (its own temporaries included) lives under one staging
    # directory, so a failure is cleaned up by removing that one directory.
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=parent))
    target = staging / path.name
    try:
        yield target
        if not target.is_dir():
            raise CheckpointError(f"could not write {path}: the writer produced no directory")
        _fsync_tree(target)
        old = staging / "previous"
        if path.exists():
            os.rename(path, old)
        try:
            os.rename(target, path)
        except OSError:
            # Put the previous checkpoint back; the two renames are the only window in which
            # ``path`` is briefly absent (POSIX has no portable atomic directory swap).
            if old.exists():
                os.rename(old, path)
            raise
        _fsync_dir(parent)
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e}; nothing was written") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)

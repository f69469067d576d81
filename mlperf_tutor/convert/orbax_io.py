"""Orbax checkpoint directories of the canonical flat dict, written and read in slices.

Saving one pytree needs the whole tree in memory, and Orbax copies it while serialising (a
one-shot save of a 2 GB tree of numpy arrays peaked at 6.2 GB RSS with orbax-checkpoint 0.12.8).
We instead add the tensors a group at a time with Orbax's partial-save API
(``orbax.checkpoint.experimental.v1.partial``), then finalize: the result is one ordinary
checkpoint that ``ocp.load`` restores as a whole. Reading restores a group at a time with
``partial_load``. A group is at most ``max(largest tensor, 64 MiB)``, so peak memory stays near
the largest tensor while small tensors are still batched into few Orbax calls.

Arrays are stored uncompressed: zstd halved the throughput and doubled the write buffers in our
measurements, while trained float weights barely compress. Each partial save re-reads the
metadata of the earlier ones, so the cost per group grows with the number of groups (about
0.1 s per group at 100 groups, 0.2 s at 300); grouping keeps that count near
``checkpoint size / largest tensor``. jax and orbax are imported inside the functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from mlperf_tutor.convert.tensors import Reader, TensorSpec, group_by_bytes, native
from mlperf_tutor.core.checkpoint import CheckpointError
from mlperf_tutor.core.files import read_json, regular_tree
from mlperf_tutor.core.io import atomic_dir

MIN_GROUP_BYTES = 64 * 2**20
CHUNK_BYTES = 32 * 2**20

# Custom metadata key under which we keep the tree's key order (Orbax sorts keys).
_META_KEY = "mlperf_tutor"
# Files inside an Orbax checkpoint directory (v0 or v1 layout, top level or one level down).
_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "orbax.checkpoint")
# The JSON files of an Orbax tree, read first with the package's guards (Orbax ignores a
# corrupt _CHECKPOINT_METADATA with a log line, which would silently lose the key order).
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA")
# Names of the file formats: a directory named so is a mistake, never an Orbax checkpoint.
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".weights.h5")


def detect(path: str, name: str) -> bool:
    """Whether ``path`` is an Orbax checkpoint directory: an existing directory (a Hugging Face
    one is told apart first, see ``FORMATS``), or a new path that ends in a separator or has no
    extension (a directory named like a checkpoint file is not one: its format refuses it)."""
    if name.endswith(_FILE_SUFFIXES):
        return False
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        return True
    return bool(name) and "." not in name and not os.path.exists(path)


def is_orbax_dir(path: Path) -> bool:
    """Whether ``path`` is absent, empty, or an Orbax checkpoint (safe to replace)."""
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    if not entries:
        return True
    names = {e.name for e in entries}
    if names & set(_MARKERS):
        return True
    return any(e.is_dir() and (e / "_METADATA").exists() for e in entries)


def _ocp():
    import orbax.checkpoint.experimental.v1 as ocp

    return ocp


def group_budget(specs: Mapping[str, TensorSpec]) -> int:
    """Bytes per Orbax call: the largest tensor, but at least :data:`MIN_GROUP_BYTES`."""
    return max([MIN_GROUP_BYTES] + [s.nbytes for s in specs.values()])


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return CheckpointError(
        f"{path} is not a readable Orbax checkpoint ({type(error).__name__}: {first}); it is "
        "incomplete or corrupt, re-save or re-copy it"
    )


def orbax_specs(path: str | os.PathLike) -> dict[str, TensorSpec]:
    """name -> spec of every tensor, from the checkpoint's metadata (no array is read).

    Raises:
        CheckpointError: no checkpoint at ``path``, a corrupt one, or one that is not a flat
            dict of arrays.
    """
    path = Path(path).absolute()  # Orbax refuses relative paths
    # Orbax and tensorstore open whatever the tree holds: a FIFO in it would block them forever.
    files = regular_tree(path, CheckpointError, "Orbax checkpoint")
    for file in files:
        if file.name in _JSON_FILES:
            read_json(file, CheckpointError, f"Orbax {file.name}", within=path)
    try:
        meta = _ocp().metadata(path)
        tree = meta.metadata
        custom = meta.custom_metadata
    except Exception as e:  # orbax, tensorstore and json raise many unrelated types
        raise _corrupt(path, e) from e
    if tree is None:
        # Orbax logs the cause as a warning and returns no metadata instead of raising.
        raise CheckpointError(
            f"{path} is not a readable Orbax checkpoint (its metadata cannot be read; Orbax's "
            "warning above says why); it is incomplete or corrupt, re-save or re-copy it"
        )
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path} holds a {type(tree).__name__}, not a dict of tensors")
    bad = [k for k, v in tree.items() if not (hasattr(v, "shape") and hasattr(v, "dtype"))]
    if bad:
        raise CheckpointError(
            f"{path} is an Orbax checkpoint but not a flat canonical dict: entries {bad} are not "
            "arrays (a nested Flax tree? load it with the JAX adapter and save to_canonical)"
        )
    order = _order(path, custom, tree)
    specs = {}
    for k in order:
        try:
            specs[k] = TensorSpec(tuple(int(d) for d in tree[k].shape), np.dtype(tree[k].dtype))
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: array {k!r} has shape {tree[k].shape} and dtype {tree[k].dtype}, "
                "which a canonical checkpoint cannot hold"
            ) from e
    return specs


def _order(path: Path, custom, tree: Mapping) -> list[str]:
    """The tree's key order that :func:`write_orbax` recorded in the custom metadata, or
    Orbax's (sorted) in a checkpoint that another program wrote.

    Raises:
        CheckpointError: a recorded order that is malformed or names other keys than the
            arrays (a damaged _CHECKPOINT_METADATA).
    """
    ours = custom.get(_META_KEY) if isinstance(custom, Mapping) else None
    if ours is None:
        return list(tree)
    order = ours.get("order") if isinstance(ours, Mapping) else None
    where = f"{path / '_CHECKPOINT_METADATA'}: field custom_metadata.{_META_KEY}.order"
    if not isinstance(order, list) or not all(isinstance(k, str) for k in order):
        raise CheckpointError(f"{where} is not a list of names; the checkpoint is damaged")
    if sorted(order) != sorted(tree):
        raise CheckpointError(
            f"{where} names other keys than the checkpoint's arrays "
            f"({sorted(set(order) ^ set(tree))[:5]}); the checkpoint is damaged, re-save it"
        )
    return order


def iter_orbax(
    path: str | os.PathLike, specs: Mapping[str, TensorSpec] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) of every tensor of ``specs``, restoring one group at a time.

    Args:
        path: the checkpoint directory.
        specs: which tensors, in this order (default: all, from :func:`orbax_specs`).
    """
    path = Path(path).absolute()  # Orbax refuses relative paths
    specs = orbax_specs(path) if specs is None else specs
    ocp = _ocp()
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    for group in group_by_bytes(specs, group_budget(specs)):
        # Zero-stride arrays: the abstract tree says "numpy array of this shape and dtype"
        # without allocating one.
        abstract = {k: np.broadcast_to(np.zeros((), specs[k].dtype), specs[k].shape) for k in group}
        try:
            with ctx:
                restored = ocp.load(path, abstract)
            arrays = {name: restored.pop(name) for name in group}
        except Exception as e:
            raise _corrupt(path, e) from e
        for name in group:
            array = arrays.pop(name)
            if not isinstance(array, np.ndarray) or (array.shape, array.dtype) != specs[name]:
                got = f"{getattr(array, 'shape', '?')} {getattr(array, 'dtype', type(array))}"
                raise CheckpointError(
                    f"{path}: array {name!r} was restored as {got}, its metadata says "
                    f"{specs[name].shape} {specs[name].dtype}; the checkpoint is damaged"
                )
            yield name, array


class OrbaxReader(Reader):
    """An Orbax checkpoint as a :class:`~mlperf_tutor.convert.tensors.Reader`: its specs from
    the metadata, its tensors restored a group at a time as they are asked for.

    Args:
        path: the checkpoint directory.
    """

    streams = True

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.specs = orbax_specs(path)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        yield from iter_orbax(self.path, self.specs)

    def costs(self) -> list[int]:
        # A group is restored at once: its first tensor brings the others along.
        costs = []
        for group in group_by_bytes(self.specs, group_budget(self.specs)):
            costs += [sum(self.specs[k].nbytes for k in group)] + [0] * (len(group) - 1)
        return costs


def _take(source: Iterator, group: list[str], specs: Mapping[str, TensorSpec], path) -> dict:
    """The next ``len(group)`` tensors of ``source``, checked against ``group`` and ``specs``."""
    batch = {}
    for expected in group:
        name, array = next(source, (None, None))
        if name != expected or (array.shape, array.dtype) != tuple(specs[name]):
            raise CheckpointError(
                f"cannot write {path}: expected tensor {expected!r} {specs[expected].shape} "
                f"{specs[expected].dtype} next, got {name!r}"
            )
        batch[name] = native(array)
    return batch


def write_orbax(
    path: str | os.PathLike,
    specs: Mapping[str, TensorSpec],
    tensors: Iterable[tuple[str, np.ndarray]],
) -> None:
    """Write an Orbax checkpoint of the flat dict atomically, a group of tensors per Orbax call.

    Tensors are pulled from ``tensors`` only as each group is saved, and released after, so a
    streaming producer keeps at most one group alive.

    Args:
        path: destination directory (replaced only once the new checkpoint is complete).
        specs: name -> spec of every tensor, in the order ``tensors`` yields them.
        tensors: (name, array) pairs in ``specs`` order.

    Raises:
        CheckpointError: the tree or a tensor is empty (Orbax stores neither), a tensor arrives
            out of order or differs from its spec; nothing is written.
    """
    empty = [k for k, s in specs.items() if s.nbytes == 0]
    if empty or not specs:
        what = f"zero-size arrays {empty}" if empty else "an empty tree"
        raise CheckpointError(
            f"cannot write {path}: Orbax cannot store {what}; use .safetensors or .pt"
        )
    ocp = _ocp()
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False
    # Chunks of at most 32 MiB: restoring a big tensor then reads chunk by chunk into the result
    # instead of into a whole-tensor buffer first (measured, a 512 MB tensor: peak RSS -450 MB,
    # restore 1.4x faster). Any Orbax reader handles chunked arrays.
    ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    # Orbax copies host arrays by default in case the caller mutates them mid-save; ours are
    # private to this call, and the copy would double the memory of every group.
    ctx.memory.deepcopy_host_arrays = False
    source = iter(tensors)
    path = Path(path).absolute()  # Orbax refuses relative paths
    with atomic_dir(path, is_orbax_dir, "an Orbax checkpoint") as target, ctx:
        try:
            for i, group in enumerate(group_by_bytes(specs, group_budget(specs))):
                batch = _take(source, group, specs, path)
                # Orbax keeps keys sorted; the first call records the canonical order.
                meta = {_META_KEY: {"order": list(specs)}} if i == 0 else None
                ocp.partial.save(target, batch, custom_metadata=meta)
                del batch  # streaming: not held while the producer reads the next group
            extra = next(source, None)
            if extra is not None:
                raise CheckpointError(f"cannot write {path}: unexpected tensor {extra[0]!r}")
            ocp.partial.finalize(target)
        except CheckpointError:
            raise
        except Exception as e:  # orbax and tensorstore raise many unrelated types
            raise CheckpointError(f"could not write {path}: {e}; nothing was written") from e

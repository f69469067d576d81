"""What every format shares: tensor specs, the dtypes a canonical tree may hold, streaming.

A :class:`Reader` is an open checkpoint of any format: the specs of its tensors (known before any
data is read where the format allows) and the tensors one at a time, so that ``convert`` moves
checkpoints larger than memory. :func:`prefetch` overlaps reading with writing within a byte
budget.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import ml_dtypes
import numpy as np

from mlperf_tutor.core.checkpoint import CheckpointError, Tree

# Every dtype a canonical tree may hold: the dtypes every format stores bit-exactly.
DTYPES = tuple(
    np.dtype(d)
    for d in (
        np.float64,
        np.float32,
        np.float16,
        ml_dtypes.bfloat16,
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
        np.int64,
        np.int32,
        np.int16,
        np.int8,
        np.uint64,
        np.uint32,
        np.uint16,
        np.uint8,
        np.bool_,
    )
)


class TensorSpec(NamedTuple):
    """Shape and dtype of one tensor, known before its bytes are read."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        # Python integers: a hostile header's [2**62, 4] must not wrap around to 0 bytes.
        return math.prod(self.shape) * self.dtype.itemsize


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


class Reader:
    """An open checkpoint: :attr:`specs` of its tensors, and the tensors one at a time.

    Subclasses set :attr:`specs` and implement :meth:`tensors`. Use as a context manager.

    Attributes:
        specs: name -> spec of every tensor, in the checkpoint's order.
        streams: whether :meth:`tensors` reads each tensor only when asked for it (then
            ``convert`` reads ahead in a background thread while writing).
    """

    specs: dict[str, TensorSpec]
    streams: bool = False

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) in :attr:`specs` order; each is the caller's to release after use."""
        raise NotImplementedError

    def costs(self) -> list[int]:
        """Bytes that producing each tensor of :meth:`tensors` allocates (see :func:`prefetch`)."""
        return [s.nbytes for s in self.specs.values()]

    def tree(self) -> Tree:
        """Every tensor, as one canonical tree."""
        return dict(self.tensors())

    def close(self) -> None:
        """Release what the reader holds open (files, mappings)."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TreeReader(Reader):
    """A checkpoint that a format reads whole (torch, Keras, Hugging Face), as a :class:`Reader`.

    Args:
        tree: the canonical tree, already read (or memory-mapped).
        where: the file, for messages about a tree that holds something unstorable.
    """

    def __init__(self, tree: Tree, where: str):
        self._tree = tree
        self.specs = specs_of(tree, where)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        while self._tree:
            # Popping lets each tensor go as soon as the consumer drops it.
            name = next(iter(self._tree))
            yield name, self._tree.pop(name)

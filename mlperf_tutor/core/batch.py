"""Checking a batch against the model it is for: every id inside its table, before a framework
sees it.

Frameworks disagree about an id outside an embedding table: PyTorch raises (on a GPU, a
device-side assert), JAX's gathers clamp or fill NaN and wrap negative ids, as TensorFlow's
Keras embeddings do. So the check is made once, on the host batch, by the same numpy code for
every framework: the adapters' ``forward``, ``loss_and_grads``, ``train_step`` and every
``Trainer.step`` call :func:`check_model_batch`, which runs the model's :class:`BatchCheck`
(``Workload.build`` attaches it as ``model.batch_check``, from ``Workload.batch_check(cfg)``).
One bad batch gives one :class:`BatchError` with the same message in torch, JAX and TF.

The cost is one reduction per id field (the maximum of the ids read as unsigned, which puts a
negative id above every table), on arrays the host holds anyway. Stdlib and numpy only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

ATTRIBUTE = "batch_check"  # the attribute of a model holding its BatchCheck


class BatchError(ValueError):
    """A batch that its model cannot take: an id outside its table, a label outside its set (the
    message names the field and the entry)."""


@dataclasses.dataclass(frozen=True)
class Ids:
    """One integer field of a batch, with values in ``[0, high)`` (or equal to ``ignore``).

    Attributes:
        key: the batch field.
        high: the exclusive upper bound: an int; a tuple of one bound per last-axis column
            (DLRM's bags, one table per feature); or the name of another batch field whose
            last dimension is the bound (BERT's masked positions, below the sequence length).
        source: where ``high`` comes from, for the message ("cfg.vocab_size"); with a tuple
            ``high``, formatted with ``{group}``, the column group of the bad entry.
        ignore: a value allowed besides the range (``-100``, labels not predicted), or None.
        floats: float values are accepted when they are whole numbers (DLRM's float labels).
        groups: with a tuple ``high``, the (G + 1,) column offsets of the groups that
            ``source`` names (DLRM's bag offsets); empty otherwise.
    """

    key: str
    high: int | tuple[int, ...] | str
    source: str
    ignore: int | None = None
    floats: bool = False
    groups: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class BatchCheck:
    """The checks of one model's batches (frozen and hashable: a static attribute of a model).

    A sequence longer than the model's positions is not checked here: the position layers
    refuse it themselves, with one message in the three frameworks (``layers.spec``).

    Attributes:
        ids: the integer fields and their ranges.
    """

    ids: tuple[Ids, ...] = ()

    def __call__(self, batch: Mapping[str, Any]) -> None:
        """Raise a :class:`BatchError` naming the first field and entry out of range.

        Fields the batch does not have are not checked (the model reports a missing one).
        """
        for spec in self.ids:
            if spec.key in batch:
                _check_ids(spec, _host(batch[spec.key]), batch)


def check_model_batch(model: Any, batch: Mapping[str, Any]) -> None:
    """Run ``model``'s :class:`BatchCheck` on ``batch`` (host arrays); nothing for a model
    built without one (a framework's ``build`` called directly)."""
    check = getattr(model, ATTRIBUTE, None)
    if check is not None:
        check(batch)


def _shape(value: Any) -> tuple[int, ...]:
    """The shape of a numpy or framework array, without copying it."""
    shape = getattr(value, "shape", None)
    return tuple(int(d) for d in (np.shape(value) if shape is None else shape))


def _host(value: Any) -> np.ndarray:
    """A batch entry as a numpy array: a numpy array as it is, a framework's array copied to
    the host (a torch tensor on a device is moved)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch, without importing it
        value = value.detach().cpu()
    return np.asarray(value)


def _unsigned(a: np.ndarray) -> np.ndarray:
    """Integers viewed as unsigned of their width: a negative value becomes larger than any
    table size, so one maximum checks both ends of ``[0, high)``."""
    if a.dtype.kind == "i":
        return a.view(a.dtype.str.replace("i", "u"))
    return a


def _check_ids(spec: Ids, a: np.ndarray, batch: Mapping[str, Any]) -> None:
    kind = a.dtype.kind
    if kind not in "biu" and not (spec.floats and kind == "f"):
        raise BatchError(
            f"batch field {spec.key!r} has dtype {a.dtype}; it holds ids, which are integers"
        )
    if a.size == 0:
        return
    high = spec.high
    source = spec.source
    if isinstance(high, str):  # the length of another field: positions inside the sequence
        source = f"{source}: the length of {high!r}"
        if high not in batch or not _shape(batch[high]):
            return
        high = _shape(batch[high])[-1]
    limits = np.asarray(high, np.int64)
    if limits.ndim and a.shape[-1:] != limits.shape:
        columns = a.shape[-1] if a.ndim else 0
        raise BatchError(
            f"batch field {spec.key!r} has {columns} columns; the model takes {limits.size}"
        )
    if kind in "iu" and spec.ignore is None:
        # The fast path: one reduction; over every axis but the last for per-column bounds.
        axes = tuple(range(a.ndim - 1)) if limits.ndim else None
        if (_unsigned(a).max(axis=axes) < limits).all():
            return
    if kind == "f":
        bad = ~((a >= 0) & (a < limits) & (a == np.floor(a)))
    else:
        bad = (a < 0) | (a >= limits) if kind != "b" else (a.astype(np.int64) >= limits)
    if spec.ignore is not None:
        bad &= a != spec.ignore
    if not bad.any():
        return
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    value = a[where].item()
    bound = int(limits if not limits.ndim else limits[where[-1]])
    if spec.groups:
        group = int(np.searchsorted(spec.groups, where[-1], side="right")) - 1
        source = spec.source.format(group=group)
    allowed = f"[0, {bound})" + (f" or {spec.ignore}" if spec.ignore is not None else "")
    raise BatchError(
        f"batch field {spec.key!r} holds {value!r} at index {list(where)}, outside {allowed} "
        f"({source} = {bound}); the batch does not fit this model's config (check the data "
        "against the config it was made for)"
    )

"""Small utilities on flat and nested dicts of arrays."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np


def flatten(nested: Mapping, sep: str = ".", prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": x}}`` -> ``{"a.b": x}``; integer keys (lists of layers) become digits."""
    flat: dict[str, object] = {}
    for key, value in nested.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, sep, name))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, object], sep: str = ".") -> dict:
    """Inverse of :func:`flatten` (keys stay strings)."""
    nested: dict = {}
    for name, value in flat.items():
        node = nested
        *parents, leaf = name.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def map_tree(fn: Callable, tree: Mapping[str, object]) -> dict[str, object]:
    """Apply ``fn`` to every value of a flat dict."""
    return {k: fn(v) for k, v in tree.items()}


def to_numpy_tree(tree: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Every value as a numpy array."""
    return {k: np.asarray(v) for k, v in tree.items()}


def num_elements(tree: Mapping[str, object]) -> int:
    """Total number of elements of all arrays."""
    return int(sum(int(np.prod(v.shape)) for v in tree.values()))


def nbytes(tree: Mapping[str, object]) -> int:
    """Total bytes of all arrays."""
    return int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in tree.values()))

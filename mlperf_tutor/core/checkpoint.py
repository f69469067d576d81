"""Canonical checkpoints: flat ``dict[str, np.ndarray]`` with PyTorch ``state_dict`` names/layouts.

Every framework adapter exports to and loads from this form, so N frameworks need 2N mappings
instead of N². Loading is all-or-nothing: :func:`check_tree` lists every missing, unexpected and
misshapen key in one error before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Tree = dict[str, np.ndarray]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


SHOWN_PER_KIND = 20  # a wrong preset of a large model mismatches thousands of keys


def _shorten(items: list) -> list:
    """At most SHOWN_PER_KIND items, then a count of the rest (the exception keeps them all)."""
    if len(items) <= SHOWN_PER_KIND:
        return items
    return items[:SHOWN_PER_KIND] + [f"... and {len(items) - SHOWN_PER_KIND} more"]


class CheckpointMismatch(CheckpointError):
    """Keys, shapes or dtypes of a checkpoint differ from what the model expects."""

    def __init__(self, missing, unexpected, misshapen, where: str = "checkpoint", hint=None):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.misshapen = list(misshapen)
        parts = []
        if self.missing:
            parts.append(f"missing keys {_shorten(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys {_shorten(self.unexpected)}")
        if self.misshapen:
            shown = [f"{k}: got {got}, expected {exp}" for k, got, exp in self.misshapen]
            parts.append(f"wrong shape or dtype [{'; '.join(_shorten(shown))}]")
        hint = hint or "check that it was saved from the same workload and preset"
        super().__init__(
            f"{where} does not match the model: {', '.join(parts)}; {hint} "
            "(nothing was loaded or written)"
        )


def spec_of(array) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a numpy array or anything with a numpy ``dtype``."""
    return tuple(array.shape), np.dtype(array.dtype).name


def check_tree(
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    got: Mapping[str, object],
    where: str = "checkpoint",
    check_dtype: bool = True,
    hint: str | None = None,
) -> None:
    """Raise :class:`CheckpointMismatch` unless ``got`` has exactly the expected keys and shapes.

    Args:
        expected: name -> (shape, dtype name), e.g. from :func:`tree_specs` of a model export.
        got: name -> array (anything with ``shape`` and ``dtype``).
        where: what ``got`` is, for the message (a file path, "canonical tree").
        check_dtype: also require equal dtypes.
        hint: what the user should do, for the message (default: about workload and preset).
    """
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshapen = []
    for key in sorted(set(expected) & set(got)):
        shape, dtype = spec_of(got[key])
        exp_shape, exp_dtype = expected[key]
        if shape != tuple(exp_shape) or (check_dtype and dtype != exp_dtype):
            misshapen.append((key, (shape, dtype), (tuple(exp_shape), exp_dtype)))
    if missing or unexpected or misshapen:
        raise CheckpointMismatch(missing, unexpected, misshapen, where, hint)


def tree_specs(tree: Mapping[str, object]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name) of every entry."""
    return {k: spec_of(v) for k, v in tree.items()}

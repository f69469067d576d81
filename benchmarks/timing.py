"""Timing shared by the GPU benchmark scripts (imported as ``timing`` from beside them)."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(step: Callable[[], object], steps: int, warmup: int, sync: Callable[[], object]) -> float:
    """Seconds per call of ``step`` after ``warmup`` calls (compilation happens there);
    ``sync`` waits for the device before each clock reading."""
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps

"""Throughput and model FLOPs utilisation of a run, and its loss curve as CSV.

MFU is model FLOPs per second (the workload's analytic count: ``Workload.flops_per_sample``)
over the device's dense bf16 peak, as PaLM (Chowdhery et al. 2022, appendix B) defines it.
Peaks are the vendors' datasheet figures for dense bf16 (no sparsity).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from mlperf_tutor.core.io import atomic_file

# Dense bf16 FLOP/s by a substring of the device name, most specific first. NVIDIA's H100 SXM,
# H200, A100 and L4 datasheets; T4 has no bf16 (fp16 figure); Google's Cloud TPU pages.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("T4", 65e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v4", 275e12),
    ("TPU v6", 918e12),
)


def peak_flops(device: str) -> float | None:
    """The dense bf16 peak of the accelerator named in ``device`` (None: CPU or unknown)."""
    for name, peak in PEAK_BF16:
        if name.lower() in device.lower():
            return peak
    return None


def mfu(flops_per_sample: float | None, samples_per_second: float, device: str) -> float | None:
    """Model FLOPs utilisation, or None where the device's peak or the FLOP count is unknown."""
    peak = peak_flops(device)
    if peak is None or not flops_per_sample:
        return None
    return flops_per_sample * samples_per_second / peak


def write_curve(
    path: str | os.PathLike,
    losses: list[float],
    evals: list[tuple[int, float]] = (),
    batch_size: int = 1,
    first_step: int = 0,
) -> None:
    """Write ``step,loss,eval`` rows to a CSV file (atomically).

    ``eval`` holds the quality metric on the rows of the steps after which an evaluation ran
    (``evals`` are (samples trained, quality) pairs), and is empty elsewhere. Steps count from
    ``first_step`` (a resumed run's first step).
    """
    quality_after = {samples // batch_size - 1: quality for samples, quality in evals}
    with atomic_file(path) as tmp, Path(tmp).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "eval"])
        for i, loss in enumerate(losses, start=first_step):
            quality = quality_after.get(i)
            writer.writerow([i, f"{loss:.8g}", "" if quality is None else f"{quality:.8g}"])

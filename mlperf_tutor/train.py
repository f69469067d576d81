"""A plain training loop for any workload in any framework, on synthetic batches.

``mlperf-tutor train WORKLOAD --framework F --preset P`` drives it: the workload's model and
optimizer through the framework adapter, with a progress bar showing loss and throughput. The
loss curve can be written to a CSV file for the chapters' plots. (MLPerf-compliant logging and
evaluation cadence build on this loop.)
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from pathlib import Path

from mlperf_tutor import frameworks, workloads
from mlperf_tutor.core.config import Config
from mlperf_tutor.workloads.base import Workload


@dataclasses.dataclass
class TrainResult:
    """Per-step losses and the timing of a run.

    Attributes:
        framework: the framework that trained.
        losses: the training loss of every step.
        seconds: wall time of the steps (compilation included).
        samples_per_second: examples per second over the steps after the first (which
            includes tracing and compilation).
    """

    framework: str
    losses: list[float]
    seconds: float
    samples_per_second: float


def train(
    workload: str | Workload,
    framework: str,
    preset: str | Config = "tiny",
    steps: int = 50,
    batch_size: int | None = None,
    seed: int = 0,
    deterministic: bool = False,
    curve: str | os.PathLike | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``workload`` for ``steps`` steps on synthetic batches.

    Args:
        workload: a workload name or object.
        framework: "torch", "jax" or "tf".
        preset: a preset name or a config.
        steps: optimizer steps.
        batch_size: examples per step (default: the config's ``global_batch_size`` if it has
            one, else 8).
        seed: seeds the initial weights and the batches (batch ``i`` uses ``seed + 1 + i``).
        deterministic: turn dropout off (``Workload.deterministic``), so that frameworks can be
            compared step by step.
        curve: a CSV path to write ``step,loss`` rows to.
        progress: show a progress bar with loss and throughput.

    Returns:
        A :class:`TrainResult`.
    """
    wl = workloads.get(workload) if isinstance(workload, str) else workload
    cfg = wl.config(preset) if isinstance(preset, str) else preset
    if deterministic:
        cfg = wl.deterministic(cfg)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    batch_size = batch_size or getattr(cfg, "global_batch_size", 8)
    adapter = frameworks.get(framework)
    adapter.seed(seed)
    model = wl.build(framework, cfg, weights=wl.init_canonical(cfg, seed=seed))
    spec, schedule = wl.optimizer(cfg)
    optimizer = adapter.make_optimizer(spec, schedule, model)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{wl.name} {framework}", unit="step")
    losses: list[float] = []
    start = first_done = time.perf_counter()
    for step in range(steps):
        batch = wl.synthetic_batch(cfg, batch_size=batch_size, seed=seed + 1 + step)
        losses.append(float(adapter.train_step(model, optimizer, batch)))
        now = time.perf_counter()
        if step == 0:
            first_done = now
        rate = step * batch_size / (now - first_done) if step > 0 else 0.0
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_per_s=f"{rate:.1f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    rate = (steps - 1) * batch_size / (time.perf_counter() - first_done) if steps > 1 else 0.0
    if curve is not None:
        write_curve(curve, losses)
    return TrainResult(framework, losses, elapsed, rate)


def write_curve(path: str | os.PathLike, losses: list[float]) -> None:
    """Write ``step,loss`` rows to a CSV file (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows((i, f"{loss:.8g}") for i, loss in enumerate(losses))
    os.replace(tmp, path)

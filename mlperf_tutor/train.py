"""A training loop for any workload in any framework, on synthetic batches, run as MLPerf runs.

``mlperf-tutor train WORKLOAD --framework F --preset P`` drives it: the workload's model and
optimizer through the framework adapter, with a progress bar showing loss and throughput. The
loss and metric curve can be written to a CSV file for the chapters' plots.

The run rules come from the workload's :class:`~mlperf_tutor.workloads.recipe.Recipe`.
Workloads with a quality target (bert: masked-LM accuracy 0.720; gpt3: log perplexity 2.69, a
loss, so reached from above) are evaluated as MLPerf does: on a held-out eval set (synthetic, the
same for every run) every ``eval_every_samples`` training samples, and once more at the step
limit. A run stops at the first evaluation that reaches the target (status "success") or at
``max_steps`` ("aborted"). With ``mllog`` the run writes an MLPerf Training v4.0 log that
``mlperf_logging.compliance_checker`` accepts and ``mlperf_tutor.mlperf.score`` scores (see
:mod:`mlperf_tutor.mlperf.mllog`).

Workloads that MLPerf starts from a checkpoint (gpt3: the reference's step-4000 checkpoint) start
from one here too: before the run (and before ``init_start``) the loop trains the steps of the
recipe's ``checkpoint`` and keeps the weights and the optimizer state, as a saved checkpoint
would; the run loads both during init and continues the step count (and so the learning-rate
schedule) from there. Its log counts samples (or tokens) from the checkpoint on.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from mlperf_tutor import frameworks, workloads
from mlperf_tutor.core.config import Config
from mlperf_tutor.mlperf.mllog import RunLog, check_benchmark
from mlperf_tutor.workloads.base import Workload
from mlperf_tutor.workloads.recipe import CheckpointStart, Recipe


@dataclasses.dataclass
class TrainResult:
    """Per-step losses, evaluations and the timing of a run.

    Attributes:
        framework: the framework that trained.
        losses: the training loss of every step taken.
        seconds: wall time of the steps and evaluations (compilation included).
        samples_per_second: examples per second over the steps after the first (which
            includes tracing and compilation); evaluations not counted.
        evals: (samples trained, quality) of every evaluation, in order.
        target: the quality that ended, or would have ended, the run (None: not evaluated).
        status: "success" (the target was reached), "aborted" (``max_steps`` was reached
            first), or None for a workload without evaluation.
        checkpoint_losses: the losses of the steps that made the start checkpoint (empty for
            workloads that start from the initial weights).
        eval_metrics: every metric of every evaluation, in order (the quality alone, or
            several: stable_diffusion's FID and CLIP score).
    """

    framework: str
    losses: list[float]
    seconds: float
    samples_per_second: float
    evals: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    target: float | None = None
    status: str | None = None
    checkpoint_losses: list[float] = dataclasses.field(default_factory=list)
    eval_metrics: list[dict[str, float]] = dataclasses.field(default_factory=list)


def _setup(
    workload: str | Workload, preset: str | Config, batch_size: int | None, deterministic: bool
) -> tuple[Workload, Config, int]:
    wl = workloads.get(workload) if isinstance(workload, str) else workload
    cfg = wl.config(preset) if isinstance(preset, str) else preset
    if deterministic:
        cfg = wl.deterministic(cfg)
    batch_size = batch_size or getattr(cfg, "global_batch_size", 8)
    return wl, cfg, batch_size


def _recipe(wl: Workload, cfg: Config, target: float | None) -> Recipe:
    """The run rules of ``cfg``, with ``target`` (when given) as the quality that ends the run."""
    recipe = wl.recipe(cfg)
    if not recipe.evaluated:
        if target is not None:
            raise ValueError(
                f"workload {wl.name!r} is not evaluated (it has no quality target), so target "
                "does not apply; drop --target"
            )
        return recipe
    if target is None:
        return recipe
    first = recipe.targets[0]
    if first.higher_is_better and not 0.0 <= target <= 1.0:
        raise ValueError(
            f"target must be a fraction between 0 and 1 ({wl.name}'s default target, "
            f"{first.metric}, is {first.value}), got {target}"
        )
    if not first.higher_is_better and target <= 0.0:
        raise ValueError(
            f"target must be positive ({wl.name}'s default target, {first.metric}, is "
            f"{first.value}), got {target}"
        )
    return recipe.with_target(target)


def _checkpoint(
    wl: Workload,
    cfg: Config,
    start: CheckpointStart | None,
    framework: str,
    batch_size: int,
    seed: int,
    progress: bool,
):
    """(weights, optimizer state, losses) after the ``start.steps`` steps of the start
    checkpoint from the initial weights, on batches ``seed + 1 + step``; (initial weights,
    None, []) without one.

    The checkpoint's model is ``start.config``'s; the run gets its trained weights where the
    names agree and its own initial weights elsewhere, and the optimizer state only when
    ``start.continues``."""
    weights = wl.init_canonical(cfg, seed=seed)
    if start is None:
        return weights, None, []
    adapter = frameworks.get(framework)
    checkpoint_cfg = start.config
    init = weights if checkpoint_cfg == cfg else wl.init_canonical(checkpoint_cfg, seed=seed)
    model = wl.build(framework, checkpoint_cfg, weights=init)
    optimizer = adapter.make_optimizer(start.optimizer, start.schedule, model)
    todo = range(start.steps)
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc=f"{wl.name} {framework} start checkpoint", unit="step")
    losses = []
    for step in todo:
        batch = wl.synthetic_batch(checkpoint_cfg, batch_size=batch_size, seed=seed + 1 + step)
        losses.append(float(adapter.train_step(model, optimizer, batch)))
    trained = adapter.to_canonical(model)
    weights = {name: trained.get(name, value) for name, value in weights.items()}
    state = optimizer.state_dict() if start.continues else None
    return weights, state, losses


def _next_eval(steps: int, batch_size: int, every: int, max_steps: int) -> int:
    """The step count of the next evaluation after ``steps``: the first step whose samples
    reach the next multiple of ``every``, or ``max_steps``, whichever comes first."""
    next_multiple = (steps * batch_size // every + 1) * every
    return min(-(-next_multiple // batch_size), max_steps)


def train(
    workload: str | Workload,
    framework: str,
    preset: str | Config = "tiny",
    max_steps: int = 50,
    batch_size: int | None = None,
    seed: int = 0,
    deterministic: bool = False,
    target: float | None = None,
    curve: str | os.PathLike | None = None,
    mllog: str | os.PathLike | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``workload`` on synthetic batches until its quality target or ``max_steps``.

    Args:
        workload: a workload name or object.
        framework: "torch", "jax" or "tf".
        preset: a preset name or a config.
        max_steps: the step limit; a workload without evaluation trains exactly this many.
        batch_size: examples per step (default: the config's ``global_batch_size`` if it has
            one, else 8).
        seed: seeds the initial weights and the batches (batch ``i`` uses ``seed + 1 + i``).
        deterministic: turn dropout off (``Workload.deterministic``), so that frameworks can be
            compared step by step.
        target: the quality that ends the run (default: the first target of the workload's
            recipe; other bars, such as stable_diffusion's CLIP score, stay); only for
            workloads that are evaluated.
        curve: a CSV path to write ``step,loss,eval`` rows to (see :func:`write_curve`).
        mllog: a file to write the run's MLPerf log to (MLPerf benchmark workloads only).
        progress: show a progress bar with loss, throughput and the last evaluation.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: ``max_steps`` below 1, a target outside [0, 1] or for a workload without
            evaluation, or ``mllog`` for a workload that is not an MLPerf benchmark.
    """
    wl, cfg, batch_size = _setup(workload, preset, batch_size, deterministic)
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    recipe = _recipe(wl, cfg, target)
    if mllog is not None:
        check_benchmark(wl, cfg)
    adapter = frameworks.get(framework)  # a missing framework fails before the log is opened
    adapter.seed(seed)
    weights, opt_state, checkpoint_losses = _checkpoint(
        wl, cfg, recipe.checkpoint, framework, batch_size, seed, progress
    )
    first_step = recipe.start_step  # batches continue after the checkpoint's
    unit = recipe.units_per_sample  # the log counts samples or tokens

    with RunLog(mllog) as log:
        log.init_start()
        log.configuration(
            wl, cfg, batch_size=batch_size, seed=seed, platform=adapter.device_summary()
        )
        model = wl.build(framework, cfg, weights=weights)
        spec, schedule = wl.optimizer(cfg)
        optimizer = adapter.make_optimizer(spec, schedule, model)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        evaluated = recipe.evaluated
        eval_set = wl.eval_set(cfg) if evaluated else None
        every = recipe.eval_every_samples(batch_size) if evaluated else None
        log.init_stop()

        log.run_start()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_steps, desc=f"{wl.name} {framework}", unit="step")
        losses: list[float] = []
        evals: list[tuple[int, float]] = []
        eval_metrics: list[dict[str, float]] = []
        shown: dict[str, str] = {}  # the progress bar's postfix
        step_seconds = 0.0  # wall time of the steps after the first
        start = time.perf_counter()
        steps, reached = 0, False
        while steps < max_steps and not reached:
            end = _next_eval(steps, batch_size, every, max_steps) if evaluated else max_steps
            # first sample (or token) of the block, and how many
            block = (steps * batch_size * unit, (end - steps) * batch_size * unit)
            log.block_start(*block)
            for step in range(steps, end):
                before = time.perf_counter()
                batch_seed = seed + 1 + first_step + step
                batch = wl.synthetic_batch(cfg, batch_size=batch_size, seed=batch_seed)
                losses.append(float(adapter.train_step(model, optimizer, batch)))
                if step > 0:
                    step_seconds += time.perf_counter() - before
                if bar is not None:
                    rate = step * batch_size / step_seconds if step > 0 else 0.0
                    shown |= {"loss": f"{losses[-1]:.4f}", "samples_per_s": f"{rate:.1f}"}
                    bar.set_postfix(shown)
                    bar.update(1)
            log.block_stop(*block)
            steps = end
            if evaluated:
                samples = steps * batch_size
                log.eval_start(samples * unit)
                measured = wl.evaluate(framework, model, eval_set, batch_size)
                # One quality, or several metrics (stable_diffusion: FID and CLIP score).
                metric = recipe.quality_metric
                metrics = measured if isinstance(measured, dict) else {metric: measured}
                quality = metrics[metric]
                log.eval_stop(samples * unit, measured)
                evals.append((samples, quality))
                eval_metrics.append(metrics)
                reached = recipe.quality_reached(metrics)
                if bar is not None:
                    shown |= {k: f"{v:.4f}" for k, v in metrics.items()}
                    bar.set_postfix(shown)
        status = ("success" if reached else "aborted") if evaluated else None
        log.run_stop(status, steps * batch_size * unit)
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    rate = (steps - 1) * batch_size / step_seconds if steps > 1 else 0.0
    if curve is not None:
        write_curve(curve, losses, evals, batch_size)
    return TrainResult(
        framework,
        losses,
        elapsed,
        rate,
        evals,
        recipe.target,
        status,
        checkpoint_losses,
        eval_metrics,
    )


def dry_run(
    workload: str | Workload,
    framework: str,
    preset: str | Config = "tiny",
    batch_size: int | None = None,
    seed: int = 0,
    deterministic: bool = False,
    mllog: str | os.PathLike | TextIO | None = None,
) -> None:
    """Log a run's configuration and hyperparameters without training or importing a framework.

    Writes the MLPerf keys a run logs during init (submission keys, seed, batch, eval samples,
    hyperparameters), with the division :func:`mlperf_tutor.mlperf.mllog.division` gives; no
    ``init_start``, ``run_start`` or results, since nothing runs.

    Args:
        workload, framework, preset, batch_size, seed, deterministic: as for :func:`train`.
        mllog: the log file, or a text stream (default: standard output).

    Raises:
        ValueError: the workload is not an MLPerf benchmark, or an unknown framework.
    """
    wl, cfg, batch_size = _setup(workload, preset, batch_size, deterministic)
    check_benchmark(wl, cfg)
    frameworks.check_name(framework)
    with RunLog(sys.stdout if mllog is None else mllog) as log:
        platform = f"{framework} (dry run: no device used)"
        log.configuration(wl, cfg, batch_size=batch_size, seed=seed, platform=platform)


def write_curve(
    path: str | os.PathLike,
    losses: list[float],
    evals: list[tuple[int, float]] = (),
    batch_size: int = 1,
) -> None:
    """Write ``step,loss,eval`` rows to a CSV file (atomically).

    ``eval`` holds the quality metric on the rows of the steps after which an evaluation ran
    (``evals`` are (samples trained, quality) pairs), and is empty elsewhere.
    """
    quality_after = {samples // batch_size - 1: quality for samples, quality in evals}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "eval"])
        for i, loss in enumerate(losses):
            quality = quality_after.get(i)
            writer.writerow([i, f"{loss:.8g}", "" if quality is None else f"{quality:.8g}"])
    os.replace(tmp, path)

"""The training loop: one path for tests, chapters, users and the GPU benchmarks.

A run places the model on a device (``device``), trains in float32 or in bf16 mixed precision
(``precision``: float32 master weights and optimizer state, bf16 compute) through the framework
adapter's ``Trainer``, reads synthetic batches or the workload's real data files (``data``),
saves checkpoints every N steps and resumes from the newest (``checkpoint_dir``, ``resume``),
and runs as MLPerf runs: the rules come from the workload's
:class:`~mlperf_tutor.workloads.recipe.Recipe`.

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

A resumed run continues exactly where the checkpoint stopped: the same learning-rate position,
the same next batch (synthetic batch ``seed + 1 + step``, or the data stream's position) and the
same RNG streams, so on one machine it reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import numbers
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from mlperf_tutor import frameworks, parallel, workloads
from mlperf_tutor.core.checkpoint import CheckpointError
from mlperf_tutor.core.config import ANY, Config, Invalid, check_float
from mlperf_tutor.mlperf.mllog import RunLog, check_benchmark
from mlperf_tutor.parallel.memory import check_batch
from mlperf_tutor.parallel.plan import MeshShape, ParallelError
from mlperf_tutor.train.checkpoints import RunCheckpoints, RunState
from mlperf_tutor.train.progress import mfu, write_curve
from mlperf_tutor.workloads.base import Workload
from mlperf_tutor.workloads.recipe import CheckpointStart, Recipe

DEVICES = ("auto", "cpu", "gpu", "tpu")
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass
class TrainResult:
    """Per-step losses, evaluations, the timing of a run and the trained model.

    Attributes:
        framework: the framework that trained.
        losses: the training loss of every step this call took (a resumed run: from
            ``start_step`` on).
        seconds: wall time of the steps and evaluations (compilation included).
        samples_per_second: examples per second over the steps after the first (which
            includes tracing and compilation); evaluations and checkpoint saves not counted.
        evals: (samples trained, quality) of every evaluation, in order.
        target: the quality that ended, or would have ended, the run (None: not evaluated).
        status: "success" (the target was reached), "aborted" (``max_steps`` was reached
            first), or None for a workload without evaluation.
        checkpoint_losses: the losses of the steps that made the recipe's start checkpoint
            (empty for workloads that start from the initial weights, and for resumed runs).
        eval_metrics: every metric of every evaluation, in order (the quality alone, or
            several: stable_diffusion's FID and CLIP score).
        model: the trained model, in ``framework``.
        device: the device the run used, as the adapter names it.
        precision: "fp32" or "bf16".
        start_step: the step the run started at (0, or the resumed checkpoint's).
        mfu: model FLOPs utilisation over the same steps as ``samples_per_second`` (None on a
            CPU or where the peak or the workload's FLOP count is unknown).
        units_per_second: ``samples_per_second`` in the recipe's units (tokens for the
            language models MLPerf counts in tokens).
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
    model: Any = None
    device: str = "cpu"
    precision: str = "fp32"
    start_step: int = 0
    mfu: float | None = None
    units_per_second: float = 0.0


def _setup(
    workload: str | Workload, preset: str | Config, batch_size: int | None, deterministic: bool
) -> tuple[Workload, Config, int]:
    wl = workloads.get(workload) if isinstance(workload, str) else workload
    cfg = wl.config(preset) if isinstance(preset, str) else preset
    if deterministic:
        cfg = wl.deterministic(cfg)
    if batch_size is None:
        return wl, cfg, getattr(cfg, "global_batch_size", 8)
    return wl, cfg, _positive_int("batch_size", batch_size)


def _positive_int(name: str, value) -> int:
    # bool is an int to Python; 0 must not fall back to a default.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be at least 1 and a whole number, got {value!r}")
    return int(value)


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
    try:
        check_float(target, ANY)
    except Invalid:
        raise ValueError(f"target must be a finite number, got {target!r}") from None
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


def _check_options(device: str, precision: str, checkpoint_every, checkpoint_dir, resume) -> None:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {list(DEVICES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if checkpoint_every is not None:
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir (where to write them)")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs checkpoint_dir (where the checkpoints are)")


def _simulate_cpu_devices(framework: str, mesh: MeshShape) -> None:
    """Give JAX (``--xla_force_host_platform_device_count``) or TensorFlow (logical CPU
    devices) as many CPU devices as ``mesh`` has, where the framework has not started yet."""
    if framework == "jax" and "jax" not in sys.modules:
        flag = f"--xla_force_host_platform_device_count={mesh.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    elif framework == "tf":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * mesh.devices
            )
        except RuntimeError:  # started already: parallel.tf names the devices it sees
            pass


def _device_count(framework: str, device_name: str) -> int:
    """How many devices of the run's kind the framework sees (torch: its processes)."""
    if framework == "torch":
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_initialized() else 1
    if framework == "jax":
        import jax

        return len(jax.devices("cpu" if device_name.lower().startswith("cpu") else None))
    import tensorflow as tf

    kind = "CPU" if device_name.lower().startswith("cpu") else "GPU"
    return len(tf.config.list_logical_devices(kind))


def _first_process(framework: str) -> bool:
    """Whether this is the process that reports (torch: rank 0; the others train silently)."""
    if framework != "torch":
        return True
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _plan(wl, cfg, framework, mesh: str, device_name, batch_size, checkpoint_dir):
    """The run's :class:`~mlperf_tutor.parallel.Plan`, after starting torch's process group
    (gloo on a CPU, NCCL on GPUs) from torchrun's environment."""
    if framework == "torch":
        import torch
        import torch.distributed as dist

        if checkpoint_dir is not None:
            raise ValueError(
                "a torch run on a mesh does not write run checkpoints yet (its sharded DCP "
                "checkpoints are ShardedTrainer.save/restore); drop checkpoint_dir"
            )
        if not dist.is_initialized():
            if "RANK" not in os.environ:
                raise ParallelError(
                    f"mesh {mesh}: torch trains on a mesh with one process per device; start "
                    "it with torchrun (mlperf-tutor train --mesh does)"
                )
            on_gpu = device_name.startswith("cuda")
            if on_gpu:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if on_gpu else "gloo")
    shape = MeshShape.parse(mesh, _device_count(framework, device_name))
    the_plan = parallel.plan(wl, cfg, shape)
    check_batch(batch_size, the_plan)
    return the_plan


class _Run:
    """What one run builds on the device: the model in a trainer, and where its batches come
    from."""

    def __init__(self, wl, cfg, framework, adapter, device, precision, seed, fused, plan=None):
        self.wl, self.cfg, self.framework = wl, cfg, framework
        self.adapter, self.device, self.precision, self.seed = adapter, device, precision, seed
        self.fused, self.plan = fused, plan

    def trainer(self, cfg: Config, weights, spec=None, schedule=None):
        """A trainer of ``cfg``'s model with ``weights`` and the workload's optimizer (on the
        run's mesh when it has a plan; the start checkpoint's model, another config, never
        is sharded)."""
        if spec is None:
            spec, schedule = self.wl.optimizer(cfg)
        if self.plan is not None and cfg == self.cfg:
            return _sharded_trainer(self, weights, spec, schedule)
        model = self.wl.build(
            self.framework, cfg, weights=weights, precision=self.precision, fused=self.fused
        )
        options = {"compile": self.fused} if self.framework == "torch" else {}
        return self.adapter.Trainer(
            model,
            spec,
            schedule,
            precision=self.precision,
            device=self.device,
            seed=self.seed,
            **options,
        )


def _sharded_trainer(run: _Run, weights, spec, schedule):
    """The framework's trainer of ``run``'s model on ``run.plan``'s mesh (see
    :mod:`mlperf_tutor.parallel`): FSDP2/tensor parallel/DDP in torch, named shardings in JAX,
    a ``MirroredStrategy`` in TensorFlow."""
    wl, cfg, plan = run.wl, run.cfg, run.plan
    options = dict(precision=run.precision, seed=run.seed)
    if run.framework == "torch":
        from mlperf_tutor.parallel import torch as ptorch

        model = wl.build("torch", cfg, weights=weights)
        mesh = ptorch.device_mesh(plan.mesh, "cuda" if run.device.startswith("cuda") else "cpu")
        return ptorch.ShardedTrainer(
            model, spec, schedule, plan, mesh, terms=wl.loss_terms(cfg), **options
        )
    if run.framework == "jax":
        import jax

        from mlperf_tutor.parallel import jax as pjax

        model = wl.build("jax", cfg, weights=weights, precision=run.precision)
        devices = jax.devices("cpu") if run.device.lower().startswith("cpu") else None
        mesh = pjax.device_mesh(plan.mesh, devices)
        return run.adapter.Trainer(
            model, spec, schedule, device=run.device, plan=plan, mesh=mesh, **options
        )
    from mlperf_tutor.parallel import tf as ptf

    with ptf.building(plan):
        model = wl.build("tf", cfg, weights=weights, precision=run.precision)
        return run.adapter.Trainer(
            model, spec, schedule, plan=ptf.realise(wl, cfg, plan), **options
        )


def _start_checkpoint(
    run: _Run, start: CheckpointStart | None, batch_size: int, progress: bool
) -> tuple[dict, dict | None, list[float]]:
    """(weights, optimizer state, losses) after the ``start.steps`` steps of the start
    checkpoint from the initial weights, on batches ``seed + 1 + step``; (initial weights,
    None, []) without one.

    The checkpoint's model is ``start.config``'s; the run gets its trained weights where the
    names agree and its own initial weights elsewhere, and the optimizer state only when
    ``start.continues``."""
    wl, cfg, seed = run.wl, run.cfg, run.seed
    weights = wl.init_canonical(cfg, seed=seed)
    if start is None:
        return weights, None, []
    checkpoint_cfg = start.config
    init = weights if checkpoint_cfg == cfg else wl.init_canonical(checkpoint_cfg, seed=seed)
    trainer = run.trainer(checkpoint_cfg, init, start.optimizer, start.schedule)
    todo = range(start.steps)
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc=f"{wl.name} {run.framework} start checkpoint", unit="step")
    handles = []
    for step in todo:
        batch = wl.synthetic_batch(checkpoint_cfg, batch_size=batch_size, seed=seed + 1 + step)
        handles.append(trainer.step(batch))
    losses = [trainer.loss_value(h) for h in handles]
    trained = trainer.weights()
    weights = {name: trained.get(name, value) for name, value in weights.items()}
    state = trainer.optimizer_state() if start.continues else None
    return weights, state, losses


def _batches(
    wl: Workload, cfg: Config, data, batch_size: int, seed: int, first: int, position: int
) -> Iterator[dict]:
    """The run's batches from ``position`` on: the data stream's, or synthetic batch
    ``seed + 1 + first + i`` for the i-th (``first``: the start checkpoint's steps)."""
    if data is not None:  # the reader checks the files now, before the first step
        return wl.data_batches(cfg, data, batch_size, seed=seed, start=position)
    return (
        wl.synthetic_batch(cfg, batch_size=batch_size, seed=seed + 1 + first + i)
        for i in itertools.count(position)
    )


def _resume_state(checkpoints: RunCheckpoints, expected: RunState):
    """The newest checkpoint's run state and state directory, checked against this run; None
    when there is none yet (a run that is told to resume starts from scratch then)."""
    latest = checkpoints.latest()
    if latest is None:
        return None
    state, state_dir = latest
    mismatched = [
        f"{name} {getattr(state, name)!r} (this run: {getattr(expected, name)!r})"
        for name in ("workload", "seed", "batch_size", "data")
        if getattr(state, name) != getattr(expected, name)
    ]
    fields = sorted(set(state.config) | set(expected.config))
    changed = [
        f"config.{k} {state.config.get(k)!r} (this run: {expected.config.get(k)!r})"
        for k in fields
        if state.config.get(k) != expected.config.get(k)
    ]
    if mismatched or changed:
        raise CheckpointError(
            f"checkpoint {state_dir.parent} was written by a different run: "
            f"{', '.join(mismatched + changed)}; resume with the same settings or choose "
            "another checkpoint directory"
        )
    return state, state_dir


def _load_checkpoint(run: _Run, trainer, state: RunState, state_dir) -> None:
    """Load a run checkpoint into ``trainer``: natively when its framework wrote it, else
    through canonical weights and optimizer state read back by the writing framework."""
    if state.framework == run.framework:
        trainer.restore(state_dir)
        return
    writer = frameworks.get(state.framework)
    # On the CPU, in the precision it was written in (frozen weights are stored in bf16 then).
    source = _Run(run.wl, run.cfg, state.framework, writer, "cpu", state.precision, run.seed, False)
    source_trainer = source.trainer(run.cfg, None)
    source_trainer.restore(state_dir)
    trainer.load_state(source_trainer.weights(), source_trainer.optimizer_state())


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
    *,
    device: str = "auto",
    precision: str = "fp32",
    data: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep: int = 2,
    resume: bool = False,
    log_every: int = 10,
    mesh: str | None = None,
) -> TrainResult:
    """Train ``workload`` until its quality target or ``max_steps``.

    Args:
        workload: a workload name or object.
        framework: "torch", "jax" or "tf".
        preset: a preset name or a config.
        max_steps: the step limit, counted from the run's start (a resumed run continues to
            it); a workload without evaluation trains exactly this many.
        batch_size: examples per step (default: the config's ``global_batch_size`` if it has
            one, else 8).
        seed: seeds the initial weights, the batches (synthetic batch ``i`` uses
            ``seed + 1 + i``; real data: the shuffle) and the RNG streams (dropout).
        deterministic: turn dropout off (``Workload.deterministic``), so that frameworks can be
            compared step by step.
        target: the quality that ends the run (default: the first target of the workload's
            recipe; other bars, such as stable_diffusion's CLIP score, stay); only for
            workloads that are evaluated.
        curve: a CSV path to write ``step,loss,eval`` rows to (see :func:`write_curve`).
        mllog: a file to write the run's MLPerf log to (MLPerf benchmark workloads only; not
            with ``resume``: an MLPerf run is one uninterrupted run).
        progress: show a progress bar with loss, throughput, MFU and the last evaluation.
        device: "auto" (the accelerator if there is one), "cpu", "gpu" or "tpu".
        precision: "fp32", or "bf16": float32 master weights and optimizer state, bf16 compute.
        data: the workload's real-format data (what ``mlperf-tutor make-sample-data`` or the
            MLPerf preprocessing writes: see ``Workload.data_batches``); None: synthetic batches.
        checkpoint_dir: where to save checkpoints (see :mod:`mlperf_tutor.train.checkpoints`);
            the run saves at its end, and every ``checkpoint_every`` steps.
        checkpoint_every: save every this many steps.
        keep: how many checkpoints to keep (the newest).
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (written by any
            framework; from scratch if there is none).
        log_every: steps between two progress updates (each one waits for the device).
        mesh: train on a device mesh such as ``"fsdp=2,tensor=2"`` (see
            :mod:`mlperf_tutor.parallel`; one axis may be -1, the devices left). torch runs
            one process per device, started by ``torchrun`` (``mlperf-tutor train --mesh``
            starts it); JAX and TensorFlow use every device of this process. On ``device="cpu"``
            JAX and TensorFlow simulate the mesh's devices on the CPU where the framework is
            not started yet. Not with ``checkpoint_dir`` in torch (its sharded checkpoints are
            the trainer's ``save``/``restore``, not the run's yet).

    Returns:
        A :class:`TrainResult`, with the trained model.

    Raises:
        ValueError: ``max_steps`` or ``batch_size`` below 1 or not a whole number, an
            unknown framework, device or precision, a target that is not finite, outside
            [0, 1] or for a workload without evaluation, or ``mllog`` for a workload that is
            not an MLPerf benchmark or with ``resume``.
        CheckpointError: the checkpoint to resume from is corrupt or from a different run.
    """
    wl, cfg, batch_size = _setup(workload, preset, batch_size, deterministic)
    max_steps = _positive_int("max_steps", max_steps)
    frameworks.check_name(framework)
    _check_options(device, precision, checkpoint_every, checkpoint_dir, resume)
    recipe = _recipe(wl, cfg, target)
    if mllog is not None:
        check_benchmark(wl, cfg)
        if resume:
            raise ValueError("an MLPerf log records one uninterrupted run; drop mllog or resume")
    if mesh is not None and device == "cpu" and frameworks.available(framework):
        _simulate_cpu_devices(framework, MeshShape.parse(mesh))
    adapter = frameworks.get(framework)  # a missing framework fails before the log is opened
    device_name = adapter.use_device(device)
    accelerated = device != "cpu" and not device_name.lower().startswith("cpu")
    plan = None
    if mesh is not None:
        plan = _plan(wl, cfg, framework, mesh, device_name, batch_size, checkpoint_dir)
        if not _first_process(framework):
            progress, mllog, curve = False, None, None
    run = _Run(wl, cfg, framework, adapter, device_name, precision, seed, accelerated, plan)
    # The accelerator's model name (for its peak FLOP/s): torch names its devices "cuda:0".
    card = f"{device_name} {adapter.device_summary()}" if accelerated else device_name
    data = None if data is None else os.fspath(data)
    # As run.json holds it (tuples become lists), so that a resumed run compares like with like.
    config_fields = json.loads(json.dumps(dataclasses.asdict(cfg)))
    this_run = RunState(wl.name, config_fields, framework, precision, seed, 0, batch_size, data, 0)
    checkpoints = RunCheckpoints(checkpoint_dir, keep) if checkpoint_dir is not None else None
    resumed = _resume_state(checkpoints, this_run) if resume else None

    first_step = recipe.start_step  # synthetic batches continue after the start checkpoint's
    start = 0 if resumed is None else resumed[0].steps
    batches = _batches(wl, cfg, data, batch_size, seed, first_step, start)
    if resumed is None:
        weights, opt_state, checkpoint_losses = _start_checkpoint(
            run, recipe.checkpoint, batch_size, progress
        )
    else:
        weights, opt_state, checkpoint_losses = None, None, []
    unit = recipe.units_per_sample  # the log counts samples or tokens

    with RunLog(mllog) as log:
        log.init_start()
        log.configuration(
            wl, cfg, batch_size=batch_size, seed=seed, platform=adapter.device_summary()
        )
        trainer = run.trainer(cfg, weights)
        if opt_state is not None:
            trainer.load_state(weights, opt_state)
        if resumed is not None:
            _load_checkpoint(run, trainer, *resumed)
        evaluated = recipe.evaluated
        eval_set = wl.eval_set(cfg) if evaluated else None
        every = recipe.eval_every_samples(batch_size) if evaluated else None
        log.init_stop()

        log.run_start()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_steps, initial=start, desc=f"{wl.name} {framework}", unit="step")
        flops = wl.flops_per_sample(cfg)
        rate_unit = "tokens_per_s" if unit > 1 else "samples_per_s"
        losses: list[float] = []
        evals: list[tuple[int, float]] = []
        eval_metrics: list[dict[str, float]] = []
        shown: dict[str, str] = {}  # the progress bar's postfix
        timed_steps, timed_seconds = 0, 0.0  # steps after this call's first, and their time
        began = time.perf_counter()
        steps, reached = start, False
        last_saved = start if resumed is not None else None

        def save(at: int) -> None:
            state = dataclasses.replace(this_run, steps=at, data_position=at)
            checkpoints.save(state, trainer.save)

        while steps < max_steps and not reached:
            end = _next_eval(steps, batch_size, every, max_steps) if evaluated else max_steps
            # first sample (or token) of the block, and how many
            block = (steps * batch_size * unit, (end - steps) * batch_size * unit)
            log.block_start(*block)
            handles = []
            mark = None  # when the timed stretch began; this call's first step is not timed
            for step in range(steps, end):
                if mark is None and step != start:
                    mark = time.perf_counter()
                handles.append(trainer.step(next(batches)))
                done = step + 1
                if step == start:  # the first step compiles: wait for it, then start the clock
                    trainer.loss_value(handles[-1])
                    mark = time.perf_counter()
                else:
                    timed_steps += 1
                save_now = checkpoint_every is not None and done % checkpoint_every == 0
                show_now = bar is not None and ((done - start) % log_every == 0 or done == end)
                if save_now or show_now or done == end:
                    loss = trainer.loss_value(handles[-1])  # waits for the device
                    now = time.perf_counter()
                    timed_seconds += now - mark
                    mark = now
                if show_now:
                    rate = timed_steps * batch_size / timed_seconds if timed_seconds else 0.0
                    shown |= {"loss": f"{loss:.4f}", rate_unit: f"{rate * unit:.1f}"}
                    utilisation = mfu(flops, rate, card)
                    if utilisation is not None:
                        shown["mfu"] = f"{utilisation:.3f}"
                    bar.set_postfix(shown)
                    bar.update(done - bar.n)
                if save_now:
                    save(done)
                    last_saved = done
                    mark = time.perf_counter()  # saving is not training time
            losses.extend(trainer.loss_value(h) for h in handles)
            log.block_stop(*block)
            steps = end
            if evaluated:
                samples = steps * batch_size
                log.eval_start(samples * unit)
                with trainer.evaluating():
                    measured = wl.evaluate(framework, trainer.model, eval_set, batch_size)
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
    if checkpoints is not None and last_saved != steps:
        save(steps)
    elapsed = time.perf_counter() - began
    rate = timed_steps * batch_size / timed_seconds if timed_seconds else 0.0
    if curve is not None:
        write_curve(curve, losses, evals, batch_size, first_step=start)
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
        model=trainer.model,
        device=device_name,
        precision=precision,
        start_step=start,
        mfu=mfu(flops, rate, card),
        units_per_second=rate * unit,
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

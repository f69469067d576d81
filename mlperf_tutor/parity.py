"""Cross-framework parity of a workload: outputs, gradients, parameters after N optimizer steps.

Every framework gets the same canonical weights and the same numpy batches, in float32 with
matmul precision pinned and dropout off (``Workload.deterministic``). Compared per framework
pair, against the bars of :mod:`mlperf_tutor.core.parity` (DESIGN.md, "Parity"):

* ``output``: every named output of an eval-mode forward, max-abs <= ``OUTPUT_ATOL``;
* ``train loss``: the loss of a train-mode forward, max-abs <= ``OUTPUT_ATOL``;
* ``gradient``: every gradient of that forward, relative <= ``STEP_RTOL``;
* ``parameter``: every parameter and buffer after ``steps`` optimizer steps, relative <=
  ``STEP_RTOL``;
* ``optimizer state``: every optimizer slot after those steps, relative <= ``STEP_RTOL``.

A relative comparison also passes below the absolute floor ``REL_ABS_FLOOR`` for tensors that
are zero in exact arithmetic.

bf16 mode (``precision="bf16"``) checks the training path's mixed precision instead: each
framework's bf16 trainer (float32 masters, bf16 compute) takes ``steps`` steps, and its loss at
every step is held to the float32 run of the first framework within ``BF16_LOSS_RTOL``
(relative). bf16 keeps 8 significant bits, so bf16 runs are compared with the float32
reference, never with each other bit for bit.

:func:`diff_layers` (:mod:`mlperf_tutor.migrate.diff_layers`) finds the first module where a
hand port of a torch module to Flax NNX diverges.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from mlperf_tutor import frameworks as fw_registry
from mlperf_tutor import workloads
from mlperf_tutor.core.config import Config
from mlperf_tutor.core.parity import OUTPUT_ATOL, STEP_RTOL, ParityReport

# Re-exported: a hand port's layer-by-layer comparison lives with the migration tools and is
# offered here beside the workloads' parity. Its module imports no framework until it is called.
from mlperf_tutor.migrate.diff_layers import diff_layers as diff_layers
from mlperf_tutor.workloads.base import Workload

# bf16 against float32: the relative loss difference allowed at each of the first ``steps``
# steps (tiny presets on CPU, batch 2: below 1e-2 for every workload but DLRM).
BF16_LOSS_RTOL = 2e-2
# DLRM trains its embedding tables with Adagrad from a zero accumulator, so the first update of
# an element is lr * sign(gradient) whatever the gradient's size: a tiny gradient that bf16
# rounds differently moves it by the full step, the other way. The bf16 run then drifts from the
# float32 one in all three frameworks alike (independent implementations): measured on the tiny
# preset, batch 2, up to 0.28 relative at step 9 (torch, JAX and TF), at batch 8 up to 0.13.
BF16_LOSS_RTOL_OF = {"dlrm_dcnv2": 0.5}


def framework_results(
    wl: Workload, cfg: Config, framework: str, steps: int, batch_size: int, seed: int
) -> dict:
    """Everything parity compares, computed in one framework (numpy arrays)."""
    adapter = fw_registry.get(framework)
    adapter.pin_precision()
    tree = wl.parity_weights(cfg, seed=seed)
    batch = wl.synthetic_batch(cfg, batch_size=batch_size, seed=seed)

    model = wl.build(framework, cfg, weights=tree)
    outputs = wl.forward(framework, model, batch, train=False)

    # A fresh model for the train-mode pass: it may update buffers (BatchNorm statistics).
    model = wl.build(framework, cfg, weights=tree)
    loss, grads = adapter.loss_and_grads(model, batch, train=True)

    model = wl.build(framework, cfg, weights=tree)
    spec, schedule = wl.optimizer(cfg)
    optimizer = adapter.make_optimizer(spec, schedule, model)
    losses = []
    for step in range(steps):
        step_batch = wl.synthetic_batch(cfg, batch_size=batch_size, seed=seed + 1 + step)
        losses.append(adapter.train_step(model, optimizer, step_batch))
    return {
        "outputs": outputs,
        "train_loss": loss,
        "grads": grads,
        "params": adapter.to_canonical(model),
        "opt_state": {k: v for k, v in optimizer.state_dict().items() if k != "step"},
        "losses": losses,
    }


def trainer_losses(
    wl: Workload,
    cfg: Config,
    framework: str,
    precision: str,
    steps: int,
    batch_size: int,
    seed: int,
) -> list[float]:
    """The losses of ``steps`` steps of the training path's trainer in ``framework``, on the
    CPU, from the parity weights and on the parity batches."""
    adapter = fw_registry.get(framework)
    adapter.pin_precision()
    device = adapter.use_device("cpu")
    model = wl.build(framework, cfg, weights=wl.parity_weights(cfg, seed=seed), precision=precision)
    spec, schedule = wl.optimizer(cfg)
    trainer = adapter.Trainer(model, spec, schedule, precision=precision, device=device, seed=seed)
    handles = [
        trainer.step(wl.synthetic_batch(cfg, batch_size=batch_size, seed=seed + 1 + step))
        for step in range(steps)
    ]
    return [trainer.loss_value(h) for h in handles]


def run_bf16(
    wl: Workload,
    cfg: Config,
    names: Sequence[str],
    steps: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> ParityReport:
    """bf16 mode: every framework's bf16 losses against the first framework's float32 ones."""
    reference = names[0]
    todo = [(reference, "fp32")] + [(f, "bf16") for f in names]
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc=f"bf16 parity {wl.name}", unit="run")
    runs = {key: trainer_losses(wl, cfg, *key, steps, batch_size, seed) for key in todo}
    report = ParityReport()
    expected = runs[(reference, "fp32")]
    bar = BF16_LOSS_RTOL_OF.get(wl.name, BF16_LOSS_RTOL)
    for framework in names:
        pair = f"{framework} bf16-{reference} fp32"
        for step, (loss, ref) in enumerate(zip(runs[(framework, "bf16")], expected, strict=True)):
            report.add("bf16 loss", f"step {step}", pair, loss, ref, "rel", bar)
    report.losses = {f"{f} {p}": losses for (f, p), losses in runs.items()}
    return report


def run(
    workload: str | Workload,
    preset: str | Config = "tiny",
    frameworks: Sequence[str] | None = None,
    steps: int = 10,
    batch_size: int = 2,
    seed: int = 0,
    progress: bool = False,
    precision: str = "fp32",
) -> ParityReport:
    """Run ``workload`` in every framework and compare each pair.

    Args:
        workload: a workload name or object.
        preset: a preset name or a config.
        frameworks: at least two framework names (bf16 mode: one is enough); default: every
            framework installed here (:func:`mlperf_tutor.frameworks.installed`). The report's
            ``missing`` attribute names the others with how to add them.
        steps: optimizer steps before parameters and optimizer state are compared.
        batch_size: examples per batch.
        seed: seeds the weights and the batches.
        progress: show a progress bar over frameworks.
        precision: "fp32" (the parity contract above) or "bf16" (bf16 mode: each framework's
            bf16 training losses against the float32 losses of the first framework).

    Returns:
        A :class:`ParityReport`; ``report.ok`` says whether every bar was met.

    Raises:
        FrameworkNotInstalled: a framework named in ``frameworks`` is not installed, or fewer
            than the two that fp32 parity compares are (the message says how to add them).
    """
    wl = workloads.get(workload) if isinstance(workload, str) else workload
    cfg = wl.deterministic(wl.config(preset) if isinstance(preset, str) else preset)
    if frameworks is None:
        names = fw_registry.installed()
    else:
        names = [fw_registry.check_name(f) for f in dict.fromkeys(frameworks)]
        fw_registry.require(f"parity of {wl.name}", *names)
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose 'fp32' or 'bf16'")
    needed = 1 if precision == "bf16" else 2
    if len(names) < needed:
        if frameworks is None:
            raise fw_registry.FrameworkNotInstalled(
                f"{precision} parity needs at least {needed} installed frameworks, and only "
                f"{names or 'none'} here; add one ("
                + "; ".join(f"{f}: {how}" for f, how in missing_frameworks().items())
                + ")"
            )
        raise ValueError(f"parity needs at least two frameworks, got {names}")
    if precision == "bf16":
        report = run_bf16(wl, cfg, names, steps, batch_size, seed, progress)
        report.missing = missing_frameworks()
        return report
    todo = names
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(names, desc=f"parity {wl.name}", unit="framework")
    results = {f: framework_results(wl, cfg, f, steps, batch_size, seed) for f in todo}

    report = ParityReport()
    for a, b in itertools.combinations(names, 2):
        pair = f"{a}-{b}"
        ra, rb = results[a], results[b]
        report.add_trees("output", pair, ra["outputs"], rb["outputs"], "max_abs", OUTPUT_ATOL)
        report.add("train loss", "loss", pair, ra["train_loss"], rb["train_loss"])
        report.add_trees("gradient", pair, ra["grads"], rb["grads"], "rel", STEP_RTOL)
        report.add_trees(f"parameter after {steps} steps", pair, ra["params"], rb["params"])
        report.add_trees(
            f"optimizer state after {steps} steps", pair, ra["opt_state"], rb["opt_state"]
        )
    report.losses = {f: results[f]["losses"] for f in names}
    report.missing = missing_frameworks()
    return report


def missing_frameworks() -> dict[str, str]:
    """The frameworks not installed here, each with how to add it (empty when none is)."""
    return {
        f: fw_registry.install_hint(f) for f in fw_registry.NAMES if not fw_registry.available(f)
    }

"""Port a PyTorch training step to JAX: model, loss, optimizer, LR scheduler, state.

``torch_to_jax(model, optimizer, loss_fn, example_batch, scheduler=None)`` gives a
:class:`Migrated`: the model's arrays as JAX arrays under their ``state_dict`` names, the optax
equivalent of the optimizer and scheduler with their state converted from torch's (moments,
accumulators, momentum buffers, step counts, the scheduler's position), and a jitted
``step(params, state, batch) -> (params, state, loss)`` that computes the numbers the torch
step would. The forward and loss are translated from ``torch.export``'s core-ATen graph by our
own interpreter (:mod:`.export`, :mod:`.interpreter`); the optimizer by :mod:`.optim`.

:func:`verify` runs the torch step and the migrated one side by side and prints a per-step
table; :func:`to_tf` turns the migrated step into a ``tf.function`` through ``jax2tf``;
:func:`to_flax_source` writes idiomatic Flax NNX source for models built from standard layers;
``mlperf_tutor.parity.diff_layers`` compares a hand port layer by layer.

Frameworks are imported when these functions are called, not when this package is imported.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np

# The parity bars: the loss is held to the output bar (max-abs), the parameters after each step
# to the bar of parameters after N steps (relative).
from mlperf_tutor.core.parity import OUTPUT_ATOL, STEP_RTOL, VerificationError
from mlperf_tutor.frameworks import require


class StepState(NamedTuple):
    """Everything a migrated step carries besides the trained parameters.

    Attributes:
        opt: the optax state (converted from the torch optimizer and scheduler).
        buffers: buffers the forward reads and updates (BatchNorm running statistics).
        frozen: parameters that do not train (``requires_grad=False``, e.g. a LoRA base).
        key: a ``jax.random.PRNGKey`` (uint32[2]); each step splits it for dropout.
    """

    opt: Any
    buffers: dict
    frozen: dict
    key: Any


@dataclasses.dataclass(eq=False)
class Migrated:
    """A PyTorch training step in JAX.

    Attributes:
        params: trained parameters, name -> jax array (torch ``state_dict`` names, layouts).
        state: the :class:`StepState` of the next step.
        step: jitted ``step(params, state, batch) -> (params, state, loss)``, one optimizer
            update in train mode; batches are dicts/tuples of arrays shaped like the example.
        loss: jitted ``loss(params, state, batch) -> loss`` in eval mode (no update).
        translation: the :class:`~mlperf_tutor.migrate.export.Translation` of the forward.
        tx: the optax transformation.
        pure_step: ``step`` before ``jax.jit`` (what :func:`to_tf` converts).
    """

    params: dict
    state: StepState
    step: Callable
    loss: Callable
    translation: Any
    tx: Any
    pure_step: Callable

    def run(self, batch) -> float:
        """One step in place (``params`` and ``state`` advance); returns the loss."""
        self.params, self.state, loss = self.step(self.params, self.state, batch)
        return float(loss)

    def params_numpy(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.params.items()}


def _check_optimizer_params(model, optimizer, translation) -> dict[int, str]:
    """id(param) -> name for every parameter the optimizer updates; clear errors for the rest."""
    names = {id(p): n for n, p in model.named_parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [p for p in held if id(p) not in names]
    if foreign:
        raise ValueError(
            f"the optimizer updates {len(foreign)} tensor(s) that are not parameters of the "
            "model; build the optimizer from model.parameters()"
        )
    unused = sorted(set(_unused_parameters(translation)) & {names[id(p)] for p in held})
    if unused:
        raise ValueError(
            f"loss_fn never uses the parameters {unused}, which the optimizer holds; torch "
            "skips them (their .grad stays None), so freeze them (requires_grad_(False)) or "
            "leave them out of the optimizer before migrating"
        )
    return {id(p): names[id(p)] for p in held}


def _unused_parameters(translation) -> list[str]:
    """Parameters that ``torch.export`` lifted as graph inputs but no op reads."""
    from mlperf_tutor.migrate.export import PREFIX

    program = translation.train_program
    to_param = program.graph_signature.inputs_to_parameters
    return [
        to_param[node.name].removeprefix(PREFIX)
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in to_param and not node.users
    ]


def torch_to_jax(
    model, optimizer, loss_fn: Callable, example_batch: Any, scheduler=None, seed: int = 0
) -> Migrated:
    """Migrate a PyTorch training step to a jitted JAX step with the same numbers.

    The torch objects are only read; migrating mid-run continues where they are (the
    optimizer's moments and step count, the scheduler's position).

    Args:
        model: the ``torch.nn.Module`` (CPU), in the mode it trains in.
        optimizer: a ``torch.optim`` SGD, Adam, AdamW, Adagrad or RMSprop over the model's
            parameters (param groups with their own hyperparameters are kept).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the forward included.
        example_batch: a dict or tuple of tensors or numpy arrays; steps take batches of the
            same structure, shapes and dtypes.
        scheduler: an optional ``torch.optim.lr_scheduler`` of ``optimizer`` (stepped once per
            optimizer step); see :data:`mlperf_tutor.migrate.optim.SUPPORTED_SCHEDULERS`.
        seed: seeds the dropout key of the migrated step (dropout masks cannot equal torch's).

    Raises:
        ExportError, UnsupportedOp: the forward cannot be translated (the op and the source
            line are named).
        ValueError: an unsupported optimizer or scheduler (the supported ones are listed), or
            optimizer parameters that the loss does not use.
    """
    require("mlperf_tutor.migrate.torch_to_jax", "torch", "jax")
    import jax
    import jax.numpy as jnp
    import optax

    from mlperf_tutor.migrate.export import translate
    from mlperf_tutor.migrate.optim import convert_optimizer

    translation = translate(model, loss_fn, example_batch)
    names = _check_optimizer_params(model, optimizer, translation)
    tx, opt_state = convert_optimizer(optimizer, names, scheduler)
    params = {k: jnp.asarray(v) for k, v in translation.params.items()}
    state = StepState(
        opt=opt_state,
        buffers={k: jnp.asarray(v) for k, v in translation.buffers.items()},
        frozen={k: jnp.asarray(v) for k, v in translation.frozen.items()},
        key=jax.random.PRNGKey(seed),
    )

    def pure_step(params, state, batch):
        key, dropout_key = jax.random.split(state.key)

        def loss_of(p):
            return translation.apply(p, state.buffers, state.frozen, batch, dropout_key)

        (loss, buffers), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt = tx.update(grads, state.opt, params)
        params = optax.apply_updates(params, updates)
        return params, StepState(opt, buffers, state.frozen, key), loss

    def eval_loss(params, state, batch):
        return translation.eval_apply(params, state.buffers, state.frozen, batch)[0]

    return Migrated(
        params=params,
        state=state,
        step=jax.jit(pure_step),
        loss=jax.jit(eval_loss),
        translation=translation,
        tx=tx,
        pure_step=pure_step,
    )


def _without_dropout(model) -> list[str]:
    """Set every dropout rate of the model's modules to 0 in place (``nn.Dropout*`` and the
    attention dropout of ``nn.MultiheadAttention``, a float attribute); the names of those
    that had one. ``F.dropout`` with a literal rate inside a custom forward is out of reach."""
    import torch

    changed = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            changed.append(name)
        elif isinstance(module, torch.nn.MultiheadAttention) and module.dropout > 0:
            module.dropout = 0.0
            changed.append(f"{name} (attention)")
    return changed


@dataclasses.dataclass
class VerifyReport:
    """Per-step comparison of a torch training step and its migration.

    Attributes:
        rows: per step: torch loss, jax loss, |difference|, the worst parameter's relative
            error (after the step) and its name.
        dropout_off: dropout modules whose rate verify set to 0 in both (masks differ).
    """

    rows: list[dict]
    dropout_off: list[str]

    @property
    def ok(self) -> bool:
        return all(r["loss diff"] <= OUTPUT_ATOL and r["worst rel"] <= STEP_RTOL for r in self.rows)

    def __str__(self) -> str:
        lines = [
            f"{'step':>4}  {'torch loss':>12}  {'jax loss':>12}  {'|diff|':>9}  "
            f"{'worst param rel':>15}  worst param"
        ]
        for r in self.rows:
            lines.append(
                f"{r['step']:>4}  {r['torch loss']:>12.6f}  {r['jax loss']:>12.6f}  "
                f"{r['loss diff']:>9.2e}  {r['worst rel']:>15.2e}  {r['worst param']}"
            )
        if self.dropout_off:
            lines.append(f"dropout set to 0 in both for: {', '.join(self.dropout_off)}")
        lines.append(
            f"{'PASS' if self.ok else 'FAIL'} (bars: loss max-abs <= {OUTPUT_ATOL:g}, parameters "
            f"relative <= {STEP_RTOL:g})"
        )
        return "\n".join(lines)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows).set_index("step")


def verify(
    model,
    optimizer,
    loss_fn: Callable,
    batches: Iterable,
    scheduler=None,
    *,
    quiet: bool = False,
    raise_on_failure: bool = True,
) -> VerifyReport:
    """Run the torch step and its migration side by side and compare every step.

    Works on deep copies: ``model``, ``optimizer`` and ``scheduler`` are left untouched. Each
    step is ``loss_fn(model, batch).backward(); optimizer.step(); scheduler.step()`` in torch
    and the migrated ``step`` in JAX, from the same state. Dropout masks cannot be equal across
    frameworks, so both run with every dropout rate set to 0 (the report lists those modules).

    Args:
        model, optimizer, loss_fn, scheduler: as for :func:`torch_to_jax`.
        batches: the batches, one per step (dicts/tuples of numpy arrays or tensors).
        quiet: do not print the table.
        raise_on_failure: raise :class:`VerificationError` past the parity bars of
            :mod:`mlperf_tutor.core.parity` (loss max-abs ``OUTPUT_ATOL``, parameters relative
            ``STEP_RTOL``); otherwise just return the report.
    """
    from mlperf_tutor.migrate.export import _as_torch

    for adapter in require("mlperf_tutor.migrate.verify", "torch", "jax"):
        adapter.pin_precision()
    model, optimizer, scheduler = copy.deepcopy((model, optimizer, scheduler))
    dropout_off = _without_dropout(model)
    batches = list(batches)
    migrated = torch_to_jax(model, optimizer, loss_fn, batches[0], scheduler)
    named = dict(model.named_parameters())
    rows = []
    for step, batch in enumerate(batches):
        optimizer.zero_grad()
        torch_loss = loss_fn(model, _as_torch(batch))
        torch_loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        jax_loss = migrated.run(batch)
        worst, worst_name = 0.0, ""
        for name, value in migrated.params.items():
            want = named[name].detach().numpy().astype(np.float64)
            err = np.linalg.norm(np.asarray(value, np.float64) - want)
            rel = err / max(np.linalg.norm(want), 1e-30)
            if rel > worst:
                worst, worst_name = float(rel), name
        t = float(torch_loss.detach())
        rows.append(
            {
                "step": step,
                "torch loss": t,
                "jax loss": jax_loss,
                "loss diff": abs(t - jax_loss),
                "worst rel": worst,
                "worst param": worst_name,
            }
        )
    report = VerifyReport(rows, dropout_off)
    if not quiet:
        print(report)
    if raise_on_failure and not report.ok:
        raise VerificationError(f"the migrated step diverged from torch:\n{report}")
    return report


def to_tf(migrated: Migrated):
    """The migrated step as a ``tf.function`` (through ``jax.experimental.jax2tf``).

    ``tf_step(params, state, batch) -> (params, state, loss)`` takes and returns the same
    structures as ``migrated.step`` with TensorFlow tensors (or numpy arrays) for leaves, and
    computes the same numbers (XLA compiles both).
    """
    require("mlperf_tutor.migrate.to_tf", "jax", "tf")
    import tensorflow as tf
    from jax.experimental import jax2tf

    converted = jax2tf.convert(migrated.pure_step, with_gradient=False)
    return tf.function(converted, autograph=False, jit_compile=True)


def to_flax_source(model, example_input, *, class_name: str | None = None):
    """Idiomatic Flax NNX source for a torch module of standard layers; see
    :func:`mlperf_tutor.migrate.flax_source.to_flax_source`."""
    require("mlperf_tutor.migrate.to_flax_source", "torch", "jax")
    from mlperf_tutor.migrate.flax_source import to_flax_source as write

    return write(model, example_input, class_name=class_name)


__all__ = [
    "Migrated",
    "StepState",
    "VerificationError",
    "VerifyReport",
    "to_flax_source",
    "to_tf",
    "torch_to_jax",
    "verify",
]

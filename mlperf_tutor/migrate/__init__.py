"""Port a PyTorch training step to JAX: model, loss, optimizer, LR scheduler, state.

``torch_to_jax(model, optimizer, loss_fn, example_batch, scheduler=None)`` gives a
:class:`Migrated`: the model's arrays as JAX arrays under their ``state_dict`` names, the optax
equivalent of the optimizer and scheduler with their state converted from torch's (moments,
accumulators, momentum buffers, step counts, the scheduler's position), and a jitted
``step(params, state, batch) -> (params, state, loss)`` that computes the numbers the torch
step would. The forward and loss are translated from ``torch.export``'s core-ATen graph by our
own interpreter (:mod:`.export`, :mod:`.interpreter`); the optimizer by :mod:`.optim`.

:func:`verify` (:mod:`.verify`) runs the torch step and the migrated one side by side, judged
against a float64 referee, and prints a per-step table; :func:`to_tf` turns the migrated step
into a ``tf.function`` through ``jax2tf``;
:func:`to_flax_source` writes idiomatic Flax NNX source for models built from standard layers;
``mlperf_tutor.parity.diff_layers`` compares a hand port layer by layer.

Frameworks are imported when these functions are called, not when this package is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from mlperf_tutor.core.parity import VerificationError
from mlperf_tutor.frameworks import require

# verify (with its float64 referee) lives in .verify; re-exported here.
from mlperf_tutor.migrate.verify import VerifyReport, _without_dropout, verify  # noqa: F401


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

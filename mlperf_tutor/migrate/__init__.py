"""Port a PyTorch training step to JAX: model, loss, optimizer, LR scheduler, state.

``torch_to_jax(model, optimizer, loss_fn, example_batch, scheduler=None)`` gives a
:class:`Migrated`: the model's arrays as JAX arrays under their ``state_dict`` names, the optax
equivalent of the optimizer and scheduler with their state converted from torch's (moments,
accumulators, momentum buffers, step counts, the scheduler's position), and a jitted
``step(params, state, batch) -> (params, state, loss)`` that computes the numbers the torch
step would. The forward and loss are translated from ``torch.export``'s core-ATen graph by our
own interpreter (:mod:`.export`, :mod:`.interpreter`); the optimizer by :mod:`.optim`. What a
training loop adds around ``loss.backward(); optimizer.step()`` (gradient clipping, gradient
accumulation, autocast) is not in those objects: ``torch_to_jax`` takes it as options, and the
user must pass the ones their loop uses. Tied parameters stay tied (one array, exported back
under every name by :meth:`Migrated.state_dict`); the batch size may change between steps.

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
        params: trained parameters, name -> jax array (torch ``named_parameters`` names and
            layouts; a tied parameter is one entry, under its first name).
        state: the :class:`StepState` of the next step.
        step: ``step(params, state, batch) -> (params, state, loss)``, one optimizer update in
            train mode: the jitted :attr:`pure_step`, plus the host-side learning rates of
            schedulers evaluated in Python (``LambdaLR`` lambdas, ``ReduceLROnPlateau``), when
            the scheduler has them. Batches are dicts/tuples of arrays with the example's
            structure and dtypes (see :func:`torch_to_jax` for the shapes that may vary).
        loss: jitted ``loss(params, state, batch) -> loss`` in eval mode (no update).
        translation: the :class:`~mlperf_tutor.migrate.export.Translation` of the forward.
        tx: the optax transformation.
        pure_step: the step as a pure function, before ``jax.jit`` (what :func:`to_tf`
            converts); with host-side rates, :attr:`step` writes the rate into ``state.opt``
            before calling it.
        host_rates: the ``HostRates`` of :mod:`.optim` that :attr:`step` calls, or None.
        torch_dtypes: every ``state_dict`` name of the torch model (aliases included), in its
            order -> the tensor's ``torch.dtype``.
        untouched: ``state_dict`` entries the step never reads or changes (parameters and
            buffers the loss does not use), as they were when migrated.
    """

    params: dict
    state: StepState
    step: Callable
    loss: Callable
    translation: Any
    tx: Any
    pure_step: Callable
    host_rates: Any = None
    torch_dtypes: dict = dataclasses.field(default_factory=dict)
    untouched: dict = dataclasses.field(default_factory=dict)

    def run(self, batch) -> float:
        """One step in place (``params`` and ``state`` advance); returns the loss."""
        self.params, self.state, loss = self.step(self.params, self.state, batch)
        return float(loss)

    def params_numpy(self, all_names: bool = False) -> dict[str, np.ndarray]:
        """The trained parameters as numpy arrays; with ``all_names``, a tied parameter also
        appears under each of its other names (``lm_head.weight`` beside
        ``transformer.wte.weight``)."""
        out = {k: np.asarray(v) for k, v in self.params.items()}
        if all_names:
            for alias, name in self.translation.aliases.items():
                if name in out:
                    out[alias] = out[name]
        return out

    def state_dict(self) -> dict:
        """The torch model's ``state_dict`` after the migrated steps, as CPU tensors under every
        name torch knows (tied tensors under each of their names, in ``state_dict`` order):
        ``model.load_state_dict(migrated.state_dict())`` copies the trained values back, and a
        tied parameter stays one tensor (both names copy the same values into it). Each tensor
        has the torch model's dtype (jax computes int64 buffers in int32)."""
        from mlperf_tutor.frameworks.torch import from_numpy

        values = {**self.untouched, **self.state.frozen, **self.state.buffers, **self.params}
        aliases = self.translation.aliases
        return {
            name: from_numpy(np.asarray(values[aliases.get(name, name)]), dtype)
            for name, dtype in self.torch_dtypes.items()
        }


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
    """Parameters that ``torch.export`` lifted as graph inputs but no op reads, under their
    first names. A tied parameter is lifted once per name (``torch.export`` routes every use
    through one of them, often the last); it is used when any of its names is."""
    from mlperf_tutor.migrate.export import PREFIX

    program = translation.train_program
    to_param = program.graph_signature.inputs_to_parameters
    lifted, used = set(), set()
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in to_param:
            name = to_param[node.name].removeprefix(PREFIX)
            name = translation.aliases.get(name, name)
            lifted.add(name)
            if node.users:
                used.add(name)
    return sorted(lifted - used)


def _check_step_options(clip_grad_norm, accumulate, autocast) -> None:
    from mlperf_tutor.migrate.export import AUTOCAST_DTYPES

    if clip_grad_norm is not None and not float(clip_grad_norm) > 0:
        raise ValueError(f"clip_grad_norm must be a positive max norm or None: {clip_grad_norm}")
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive int (micro-batches), not {accumulate!r}")
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(
            f"autocast={autocast!r} is not supported; use None or one of {list(AUTOCAST_DTYPES)} "
            "(torch.autocast(device, dtype=torch.bfloat16))"
        )


def _micro_batches(batch, accumulate: int):
    """(k, B/k, ...) per leaf: ``accumulate`` consecutive micro-batches, as ``tensor.chunk(k)``
    splits a batch of B rows."""
    import jax

    def split(x):
        shape = np.shape(x)
        if not shape or shape[0] % accumulate:
            raise ValueError(
                f"accumulate={accumulate} splits every batch tensor along its leading dimension "
                f"into {accumulate} equal micro-batches; a tensor of shape {tuple(shape)} cannot "
                f"be split (give a batch whose leading size is a multiple of {accumulate})"
            )
        return x.reshape(accumulate, shape[0] // accumulate, *shape[1:])

    return jax.tree.map(split, batch)


def _clip_by_total_norm(grads: dict, max_norm: float) -> dict:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)``: the 2-norm of the per-tensor
    2-norms, ``clip_coef = max_norm / (total + 1e-6)`` clamped to 1.0, every gradient scaled by
    it (also when the coefficient is 1, as torch does)."""
    import jax.numpy as jnp

    norms = [jnp.linalg.norm(g.ravel().astype(jnp.float32)) for g in grads.values()]
    total = jnp.linalg.norm(jnp.stack(norms))
    coef = jnp.minimum(max_norm / (total + 1e-6), 1.0)
    return {k: g * coef.astype(g.dtype) for k, g in grads.items()}


def _as_numpy(batch):
    """The batch with torch tensors as numpy arrays (other leaves as they are)."""
    import jax
    import torch

    from mlperf_tutor.frameworks.torch import to_numpy

    return jax.tree.map(lambda x: to_numpy(x) if isinstance(x, torch.Tensor) else x, batch)


class _Translations:
    """The translation for each set of batch shapes a step sees: the first one (exported with
    a dynamic batch dimension where the model allows it), and one fixed-shape ``torch.export``
    per shape set it does not take (made while ``jax.jit`` traces, once per shape set). A
    dynamic graph that an op translation cannot run is replaced the same way."""

    def __init__(self, model, loss_fn, example_batch, autocast):
        from mlperf_tutor.migrate.export import _as_torch, translate

        self._model, self._loss_fn, self._autocast = model, loss_fn, autocast
        self._example = _as_torch(example_batch)
        self.first = translate(model, loss_fn, self._example, autocast=autocast)
        self._fixed: dict[tuple, Any] = {}

    def _shapes(self, batch) -> tuple | None:
        from mlperf_tutor.migrate.export import _fetch

        try:
            return tuple(tuple(np.shape(_fetch(batch, k))) for k, _, _ in self.first._leaves)
        except (KeyError, IndexError, TypeError):
            return None  # the first translation's apply names what is missing

    def for_batch(self, batch):
        shapes = self._shapes(batch)
        if shapes in self._fixed:
            return self._fixed[shapes]
        if shapes is None or self.first.accepts(batch):
            return self.first
        return self._export_fixed(batch, shapes)

    def _export_fixed(self, batch, shapes):
        import torch
        from torch.utils import _pytree as pytree

        from mlperf_tutor.migrate.export import _fetch, _path_keys, translate

        # Values do not matter to torch.export (it traces with fake tensors): zeros of the
        # new shapes, in the example's dtypes.
        def zeros(path, leaf):
            if not isinstance(leaf, torch.Tensor):
                return leaf
            return torch.zeros(np.shape(_fetch(batch, _path_keys(path))), dtype=leaf.dtype)

        example = pytree.tree_map_with_path(zeros, self._example)
        self._fixed[shapes] = translate(
            self._model, self._loss_fn, example, autocast=self._autocast, dynamic_batch=False
        )
        return self._fixed[shapes]

    def apply(self, params, buffers, frozen, batch, key=None, train=True):
        """:meth:`Translation.apply` with the translation for the batch's shapes."""
        from mlperf_tutor.migrate.interpreter import OpError

        translation = self.for_batch(batch)
        try:
            return translation.apply(params, buffers, frozen, batch, key, train)
        except OpError:
            if translation.batch_range is None:
                raise
        # An op could not run the dynamic graph (it is only traced here: nothing ran yet).
        fixed = self._export_fixed(batch, self._shapes(batch))
        return fixed.apply(params, buffers, frozen, batch, key, train)


def torch_to_jax(
    model,
    optimizer,
    loss_fn: Callable,
    example_batch: Any,
    scheduler=None,
    seed: int = 0,
    *,
    clip_grad_norm: float | None = None,
    accumulate: int = 1,
    autocast: str | None = None,
) -> Migrated:
    """Migrate a PyTorch training step to a jitted JAX step with the same numbers.

    The torch objects are only read; migrating mid-run continues where they are (the
    optimizer's moments and step count, the scheduler's position).

    The migrated step is ``loss_fn(model, batch).backward(); optimizer.step();
    scheduler.step()``. What a training loop adds around that is not in the model, the
    optimizer or the loss, so it cannot be detected: **pass the options your torch loop uses**
    (``clip_grad_norm``, ``accumulate``, ``autocast``), or the migrated step computes something
    else than your loop (without ``clip_grad_norm=1.0``, a loop that clips diverges from its
    migration in a few steps). The step is::

        for micro in zip(*(t.chunk(accumulate) for t in batch)):   # accumulate micro-batches
            with torch.autocast("cpu", dtype=torch.bfloat16):      # autocast="bf16"
                loss = loss_fn(model, micro)
            (loss / accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)  # clip_grad_norm
        optimizer.step(); scheduler.step(); optimizer.zero_grad()

    Shapes: the leading (batch) dimension of every batch tensor whose leading size is the
    example's may change from step to step (a smaller last batch); it is exported as a dynamic
    dimension (``torch.export.Dim``). Any other dimension (sequence length, image size), or
    the batch size of a model whose code specialises on it (e.g. ``x.view(8, -1)``), may change
    too, at the cost of one more ``torch.export`` and ``jax.jit`` trace per new shape set; the
    torch model must stay alive for that (it is only read). ``jax.jit`` compiles once per shape
    in either case.

    Args:
        model: the ``torch.nn.Module`` (CPU), in the mode it trains in. Tied parameters (one
            ``Parameter`` under two names, like an embedding shared with the LM head) are one
            JAX array under the first name ``named_parameters()`` gives, with the sum of both
            uses' gradients and one optimizer state, as in torch; :meth:`Migrated.state_dict`
            gives it back under every name.
        optimizer: a ``torch.optim`` optimizer over the model's parameters (param groups with
            their own hyperparameters are kept); see
            :data:`mlperf_tutor.migrate.optim.SUPPORTED_OPTIMIZERS`.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the forward included.
        example_batch: a dict or tuple of tensors or numpy arrays, one step's batch (with
            ``accumulate=k``, all k micro-batches); steps take batches of the same structure
            and dtypes.
        scheduler: an optional ``torch.optim.lr_scheduler`` of ``optimizer`` (stepped once per
            optimizer step); see :data:`mlperf_tutor.migrate.optim.SUPPORTED_SCHEDULERS`.
        seed: seeds the dropout key of the migrated step (dropout masks cannot equal torch's).
        clip_grad_norm: the ``max_norm`` of ``torch.nn.utils.clip_grad_norm_(params,
            max_norm)`` (2-norm over every parameter's gradient, after accumulation, before
            the optimizer), or None for no clipping.
        accumulate: k micro-batches per optimizer step. Each batch tensor's leading size must
            be a multiple of k; the batch is split into k consecutive equal micro-batches (as
            ``tensor.chunk(k)``), and the gradients are summed as ``(loss / k).backward()`` k
            times sums them; BatchNorm statistics update once per micro-batch, and each
            micro-batch draws its own dropout masks. The step's loss is the mean of the k
            micro-batch losses.
        autocast: None, or "bf16": the forward as under ``torch.autocast("cpu",
            dtype=torch.bfloat16)``, with float32 parameters as masters and float32 gradients.
            ``torch.export`` records torch's own CPU autocast policy as casts in the graph: ops
            on its lower-precision list (matmul, linear, convolutions, bmm, attention) compute
            in bf16, ops on its float32 list (cross_entropy, nll_loss, mse_loss, ...) in
            float32, and the rest in their inputs' dtype (a LayerNorm after a linear layer runs
            in bf16). A GPU recipe's ``torch.autocast("cuda", ...)`` has other lists (softmax
            and layer_norm in float32, for one), so the numbers differ from a GPU run by bf16
            round-off. A ``loss_fn`` that enters ``torch.autocast`` itself is exported as it is.

    Raises:
        ExportError, UnsupportedOp: the forward cannot be translated (the op and the source
            line are named).
        ValueError: an unsupported optimizer or scheduler (the supported ones are listed),
            optimizer parameters that the loss does not use, or an invalid step option.
    """
    require("mlperf_tutor.migrate.torch_to_jax", "torch", "jax")
    import jax
    import jax.numpy as jnp
    import optax

    from mlperf_tutor.frameworks.torch import to_numpy
    from mlperf_tutor.migrate import optim as optim_module
    from mlperf_tutor.migrate.export import _as_torch

    _check_step_options(clip_grad_norm, accumulate, autocast)
    example = _as_torch(example_batch)
    if accumulate > 1:
        example = jax.tree.map(lambda x: x[0], _micro_batches(example, accumulate))
    translations = _Translations(model, loss_fn, example, autocast)
    translation = translations.first
    names = _check_optimizer_params(model, optimizer, translation)
    tx, opt_state = optim_module.convert_optimizer(optimizer, names, scheduler)
    host_rates = getattr(optim_module, "host_rates", None)
    rates = None if host_rates is None else host_rates(optimizer, scheduler)
    params = {k: jnp.asarray(v) for k, v in translation.params.items()}
    state = StepState(
        opt=opt_state,
        buffers={k: jnp.asarray(v) for k, v in translation.buffers.items()},
        frozen={k: jnp.asarray(v) for k, v in translation.frozen.items()},
        key=jax.random.PRNGKey(seed),
    )

    def grads_of(params, state, batch, key):
        """(loss, buffers, grads) of one step's batch: one micro-batch, or ``accumulate``."""

        def loss_of(p, buffers, micro, key, scale):
            loss, buffers = translations.apply(p, buffers, state.frozen, micro, key)
            return loss / scale if scale != 1 else loss, (loss, buffers)

        if accumulate == 1:
            (_, (loss, buffers)), grads = jax.value_and_grad(loss_of, has_aux=True)(
                params, state.buffers, batch, key, 1
            )
            return loss, buffers, grads

        def micro_step(carry, xs):
            total, buffers, summed = carry
            micro, micro_key = xs
            (scaled, (_, buffers)), grads = jax.value_and_grad(loss_of, has_aux=True)(
                params, buffers, micro, micro_key, accumulate
            )
            summed = jax.tree.map(jnp.add, summed, grads)
            return (total + scaled, buffers, summed), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        keys = jax.random.split(key, accumulate)
        start = (jnp.zeros((), jnp.float32), state.buffers, zeros)
        (loss, buffers, grads), _ = jax.lax.scan(
            micro_step, start, (_micro_batches(batch, accumulate), keys)
        )
        return loss, buffers, grads

    def pure_step(params, state, batch):
        key, dropout_key = jax.random.split(state.key)
        loss, buffers, grads = grads_of(params, state, batch, dropout_key)
        if clip_grad_norm is not None:
            grads = _clip_by_total_norm(grads, float(clip_grad_norm))
        updates, opt = tx.update(grads, state.opt, params)
        params = optax.apply_updates(params, updates)
        return params, StepState(opt, buffers, state.frozen, key), loss

    def eval_loss(params, state, batch):
        return translations.apply(params, state.buffers, state.frozen, batch, train=False)[0]

    jitted = jax.jit(pure_step)

    def step(params, state, batch):
        batch = _as_numpy(batch)  # torch tensors are welcome; jit takes arrays
        if rates is not None:  # the rate of the step about to run, from the host-side schedule
            state = state._replace(opt=rates.before_step(state.opt))
        params, state, loss = jitted(params, state, batch)
        if rates is not None:
            rates.after_step(float(loss) if rates.needs_loss else None)
        return params, state, loss

    used = {*translation.params, *translation.buffers, *translation.frozen}
    torch_state = model.state_dict()
    untouched = {
        k: to_numpy(v)
        for k, v in torch_state.items()
        if translation.aliases.get(k, k) not in used and k not in translation.aliases
    }
    return Migrated(
        params=params,
        state=state,
        step=step,
        loss=jax.jit(eval_loss),
        translation=translation,
        tx=tx,
        pure_step=pure_step,
        host_rates=rates,
        torch_dtypes={k: v.dtype for k, v in torch_state.items()},
        untouched=untouched,
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


def to_flax_source(model, example_input, *, class_name: str | None = None, fallback: bool = True):
    """Idiomatic Flax NNX source for a torch module of standard layers (submodules that cannot
    become readable Flax run through the interpreter, with a comment saying why, unless
    ``fallback=False``); see :func:`mlperf_tutor.migrate.flax_source.to_flax_source`."""
    require("mlperf_tutor.migrate.to_flax_source", "torch", "jax")
    from mlperf_tutor.migrate.flax_source import to_flax_source as write

    return write(model, example_input, class_name=class_name, fallback=fallback)


def coverage() -> list[dict]:
    """The core ATen opset and what the interpreter does with each op (rows ``op``,
    ``covered``, ``tested``, ``note``); see :func:`mlperf_tutor.migrate.aten_coverage.coverage`."""
    require("mlperf_tutor.migrate.coverage", "torch", "jax")
    from mlperf_tutor.migrate.aten_coverage import coverage as rows

    return rows()


__all__ = [
    "Migrated",
    "StepState",
    "VerificationError",
    "VerifyReport",
    "coverage",
    "to_flax_source",
    "to_tf",
    "torch_to_jax",
    "verify",
]

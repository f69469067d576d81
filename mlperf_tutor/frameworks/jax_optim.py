"""OptimizerSpec + ScheduleSpec as an optax ``GradientTransformation``, with PyTorch's numbers.

The transformation works on a flat ``dict[str, array]`` keyed by canonical parameter name, so
weight-decay and trust-ratio masks come straight from ``OptimizerSpec.decays(name)`` and the
optimizer state is keyed like the canonical state. Optax building blocks are used where their
numbers are PyTorch's (``trace``, ``add_decayed_weights``, ``clip_by_global_norm``,
``scale_by_trust_ratio`` under ``masked``, ``scale_by_learning_rate``). Two are written here:
Adagrad, because optax puts epsilon inside the square root and starts the accumulator at 0.1,
and Adam's direction, because ``optax.scale_by_adam`` rounds ``b`` to float32 in ``1 - b**t``
(see :func:`scale_by_torch_adam`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlperf_tutor.core.checkpoint import check_tree
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec, state_key

# optax state field -> PyTorch state name (the canonical slot).
SLOT_FIELDS = {"trace": "momentum_buffer", "mu": "exp_avg", "nu": "exp_avg_sq", "sum": "sum"}


def schedule_fn(schedule: ScheduleSpec) -> Callable[[jax.Array], jax.Array]:
    """``schedule.lr_at`` as an optax schedule: a traceable function of the update count.

    Computed in the default float dtype (float64 under ``jax.enable_x64``), so a float64 run
    sees the same learning rates as the numpy reference.
    """
    s = schedule

    def decayed(step):
        if s.decay == "constant":
            return jnp.full_like(step, s.lr)
        if s.decay == "polynomial":
            frac = jnp.minimum(step, s.total_steps) / s.total_steps
            return (s.lr - s.end_lr) * (1.0 - frac) ** s.power + s.end_lr
        w = s.warmup_steps + s.start_warmup_step if s.warmup_steps > 0 else 0
        p = jnp.clip((step - w) / max(s.total_steps - w, 1), 0.0, 1.0)
        return s.end_lr + (s.lr - s.end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))

    def lr(count):
        # Decided when traced, so that an enable_x64 context at trace time gives float64.
        step = jnp.asarray(count).astype(jax.dtypes.canonicalize_dtype(jnp.float64))
        if s.warmup_steps <= 0:
            return decayed(step)
        since = step - s.start_warmup_step
        f = s.warmup_init_factor
        warm = s.lr * (f + (1.0 - f) * since / s.warmup_steps)
        return jnp.where(since < s.warmup_steps, warm, decayed(step))

    return lr


class ScaleByTorchAdagradState(NamedTuple):
    """State of :func:`scale_by_torch_adagrad`: the running sum of squared gradients."""

    sum: Any


def scale_by_torch_adagrad(initial_accumulator: float, eps: float) -> optax.GradientTransformation:
    """Adagrad as ``torch.optim.Adagrad``: ``s += g**2``; ``g / (sqrt(s) + eps)``.

    Args:
        initial_accumulator: value every element of ``s`` starts at.
        eps: added outside the square root.
    """

    def init(params):
        return ScaleByTorchAdagradState(
            sum=jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator), params)
        )

    def update(updates, state, params=None):
        del params
        acc = jax.tree.map(lambda s, g: s + g * g, state.sum, updates)
        updates = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, acc)
        return updates, ScaleByTorchAdagradState(sum=acc)

    return optax.GradientTransformation(init, update)


def scale_by_torch_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` with exact bias corrections.

    The state is optax's ``ScaleByAdamState``. ``optax.scale_by_adam`` has the same formula but
    computes ``1 - b**t`` in the parameter dtype from ``b`` rounded to it: in float32,
    ``1 - 0.999`` comes out 1.3e-5 too small, which moves the first updates by ~1e-5 relative.
    PyTorch computes the correction in Python floats; ``-expm1(t * log(b))`` is as accurate.

    Args:
        b1: decay of the first moment.
        b2: decay of the second moment.
        eps: added outside the square root.
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
        count = optax.safe_int32_increment(state.count)

        def direction(m, v):
            t = count.astype(jnp.promote_types(m.dtype, jnp.float32))  # bf16 can't count
            c1, c2 = -jnp.expm1(t * log_b1), -jnp.expm1(t * log_b2)
            return (m / c1) / (jnp.sqrt(v / c2) + eps)

        updates = jax.tree.map(direction, mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def make_transformation(
    spec: OptimizerSpec, schedule: ScheduleSpec, names: Iterable[str]
) -> optax.GradientTransformation:
    """The optax transformation of ``spec`` + ``schedule`` over a dict keyed by ``names``.

    Args:
        spec: the optimizer.
        schedule: the learning-rate schedule.
        names: the canonical parameter names, the keys of the params/updates dicts (they decide
            weight decay and LAMB's trust ratio).
    """
    decay_mask = {name: spec.decays(name) for name in names}
    parts = []
    if spec.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(spec.clip_norm))
    l2 = []
    if spec.weight_decay:
        l2 = [optax.add_decayed_weights(spec.weight_decay, mask=decay_mask)]
    if spec.name == "sgd":
        parts += l2
        if spec.momentum > 0:
            parts.append(optax.trace(decay=spec.momentum, nesterov=spec.nesterov))
    elif spec.name == "adagrad":
        parts += [*l2, scale_by_torch_adagrad(spec.initial_accumulator, spec.eps)]
    else:
        adam = scale_by_torch_adam(spec.beta1, spec.beta2, spec.eps)
        if spec.name == "adam":  # L2: the decay joins the gradient before the moments
            parts += [*l2, adam]
        else:  # adamw, lamb: decoupled, added to the Adam direction (lr * wd * p overall)
            parts += [adam, *l2]
        if spec.name == "lamb":
            # MLPerf BERT skips the trust ratio for exactly the parameters without weight decay.
            parts.append(optax.masked(optax.scale_by_trust_ratio(), decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule_fn(schedule)))
    return optax.chain(*parts)


def _read_fields(state, found: dict[str, Any] | None = None) -> dict[str, Any]:
    """First value of ``count`` and of each slot field in a nested optax state."""
    found = {} if found is None else found
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        for field, value in state._asdict().items():
            if field == "count" or field in SLOT_FIELDS:
                found.setdefault(field, value)
            else:
                _read_fields(value, found)
    elif isinstance(state, (tuple, list)):
        for item in state:
            _read_fields(item, found)
    return found


def _replace_fields(state, new: Mapping[str, Any]):
    """A copy of an optax state with every field named in ``new`` replaced."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        fields = state._asdict().items()
        return type(state)(*(new[f] if f in new else _replace_fields(v, new) for f, v in fields))
    if isinstance(state, (tuple, list)):
        return type(state)(_replace_fields(item, new) for item in state)
    return state


def to_canonical_layout(a: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray:
    """Framework layout -> canonical layout (a copy)."""
    return np.ascontiguousarray(np.transpose(a, perm)) if perm else np.array(a)


def from_canonical_layout(a: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray:
    """Canonical layout -> framework layout (inverse of :func:`to_canonical_layout`)."""
    return np.ascontiguousarray(np.transpose(a, np.argsort(perm))) if perm else np.asarray(a)


class OptaxState:
    """An optax transformation over canonical names, with its state and the canonical state dict.

    Args:
        spec: the optimizer.
        schedule: the learning-rate schedule.
        params: canonical name -> parameter (framework layout), to create the state.
        perms: canonical name -> axes permutation to the canonical layout (None: same layout).
        native: the transformation, when the caller already made it (see ``make_transformation``).
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        schedule: ScheduleSpec,
        params: Mapping[str, jax.Array],
        perms: Mapping[str, tuple[int, ...] | None],
        native: optax.GradientTransformation | None = None,
    ):
        self.spec = spec
        self.schedule = schedule
        self._perms = dict(perms)
        self._specs = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in params.items()}
        self.native = native if native is not None else make_transformation(spec, schedule, params)
        with self._context():
            self.opt_state = self.native.init(dict(params))

    def _context(self):
        return contextlib.nullcontext()

    @property
    def step_count(self) -> int:
        """Number of updates applied."""
        return int(_read_fields(self.opt_state)["count"])

    def _canonical_shape(self, name: str) -> tuple[int, ...]:
        shape, perm = self._specs[name][0], self._perms[name]
        return tuple(shape[i] for i in perm) if perm else shape

    def state_dict(self) -> dict[str, np.ndarray]:
        """Canonical state: ``"step"`` and ``f"{slot}/{name}"`` in canonical layouts (numpy)."""
        fields = _read_fields(self.opt_state)
        out = {"step": np.array(int(fields["count"]), dtype=np.int64)}
        for field, slot in SLOT_FIELDS.items():
            for name, value in fields.get(field, {}).items():
                perm = self._perms[name]
                out[state_key(slot, name)] = to_canonical_layout(np.asarray(value), perm)
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the state with a canonical state dict.

        Raises:
            ValueError: (a ``CheckpointMismatch``) naming every missing, unexpected or misshapen
                key; nothing is changed then.
        """
        expected = {"step": ((), "int64")}
        for slot in self.spec.slots:
            for name, (_, dtype) in self._specs.items():
                expected[state_key(slot, name)] = (self._canonical_shape(name), dtype.name)
        # Dtypes are cast (a float32 state may continue a float64 run); keys and shapes are strict.
        check_tree(
            expected,
            state,
            where="optimizer state",
            check_dtype=False,
            hint="pass the state_dict of an optimizer with the same spec and parameters",
        )
        new: dict[str, Any] = {}
        with self._context():
            new["count"] = jnp.asarray(int(np.asarray(state["step"])), dtype=jnp.int32)
            for field, slot in SLOT_FIELDS.items():
                if slot in self.spec.slots:
                    new[field] = {
                        name: jnp.asarray(
                            from_canonical_layout(np.asarray(state[state_key(slot, name)]), perm),
                            dtype=self._specs[name][1],
                        )
                        for name, perm in self._perms.items()
                    }
            self.opt_state = _replace_fields(self.opt_state, new)


def _apply(tx, params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class ArrayOptimizer(OptaxState):
    """The optimizer over free-standing arrays (tests, the optimizer chapter).

    Float64 parameters are kept and updated in float64 inside ``jax.enable_x64`` contexts, so
    the process-wide ``jax_enable_x64`` flag stays as it was.

    Args:
        spec: the optimizer.
        schedule: the learning-rate schedule.
        params: canonical name -> initial value (numpy), in canonical layout.
    """

    def __init__(self, spec: OptimizerSpec, schedule: ScheduleSpec, params: Mapping[str, Any]):
        self._x64 = any(np.dtype(v.dtype).itemsize == 8 for v in params.values())
        with self._context():
            arrays = {k: jnp.asarray(v) for k, v in params.items()}
        super().__init__(spec, schedule, arrays, {k: None for k in params})
        self._params = arrays
        tx = self.native
        self._update = jax.jit(lambda p, s, g: _apply(tx, p, s, g))

    def _context(self):
        return jax.enable_x64(True) if self._x64 else contextlib.nullcontext()

    def params(self) -> dict[str, np.ndarray]:
        """Current parameters (numpy copies)."""
        return {k: np.array(v) for k, v in self._params.items()}

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """Apply one update with ``grads`` (canonical name -> gradient)."""
        if set(grads) != set(self._params):
            missing = sorted(set(self._params) - set(grads))
            extra = sorted(set(grads) - set(self._params))
            raise ValueError(
                f"gradients do not match the parameters: missing {missing}, unexpected {extra}; "
                "pass one gradient per parameter name"
            )
        with self._context():
            g = {k: jnp.asarray(grads[k], dtype=self._specs[k][1]) for k in self._params}
            self._params, self.opt_state = self._update(self._params, self.opt_state, g)


def make_array_optimizer(
    spec: OptimizerSpec, schedule: ScheduleSpec, params: Mapping[str, np.ndarray]
) -> ArrayOptimizer:
    """An :class:`ArrayOptimizer` over ``params`` (canonical name -> numpy array)."""
    return ArrayOptimizer(spec, schedule, params)

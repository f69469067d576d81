"""OptimizerSpec + ScheduleSpec as a Keras 3 optimizer, with PyTorch's numbers.

Keras' built-in optimizers compute other things than ``torch.optim`` (and the numpy oracle
``core.reference``): Adam adds epsilon to the bias-corrected denominator differently ("epsilon
hat"), Adagrad starts its accumulator at 0.1 and puts epsilon inside the square root, AdamW
decays with a default rate, and there is no MLPerf LAMB. :class:`SpecOptimizer` therefore writes
every rule of :class:`~mlperf_tutor.core.optim.OptimizerSpec` in TensorFlow ops.

Keras knows variables only by leaf names (``kernel``), while weight-decay masks are regular
expressions on canonical names (``encoder.dense.weight``); the optimizer is given a
variable -> canonical name mapping to decide masking.

Numbers mirror the reference: hyperparameters and the learning rate are computed in float64 and
cast to the parameter's dtype where numpy would cast a Python float, so float64 parameters get
float64 updates and float32 ones float32 updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from mlperf_tutor.core.checkpoint import check_tree
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec, state_key


class SpecSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A :class:`ScheduleSpec` as a Keras learning-rate schedule (works inside ``tf.function``).

    Args:
        spec: the schedule.
    """

    def __init__(self, spec: ScheduleSpec):
        self.spec = spec

    def lr_at(self, step, dtype=tf.float64) -> tf.Tensor:
        """The rate of 0-based update ``step`` (int or tensor), computed in float64.

        Args:
            step: number of updates applied before this one.
            dtype: dtype of the result (the cast happens after the float64 computation).
        """
        s = self.spec
        step = tf.cast(step, tf.float64)
        if s.decay == "constant":
            after = tf.constant(s.lr, tf.float64)
        elif s.decay == "polynomial":
            frac = tf.minimum(step, s.total_steps) / s.total_steps
            after = (s.lr - s.end_lr) * tf.pow(1.0 - frac, s.power) + s.end_lr
        else:
            w = s.warmup_steps + s.start_warmup_step if s.warmup_steps > 0 else 0
            p = tf.clip_by_value((step - w) / max(s.total_steps - w, 1), 0.0, 1.0)
            after = s.end_lr + (s.lr - s.end_lr) * 0.5 * (1.0 + tf.cos(math.pi * p))
        if s.warmup_steps > 0:
            since = step - s.start_warmup_step
            f = s.warmup_init_factor
            warm = s.lr * (f + (1.0 - f) * since / s.warmup_steps)
            after = tf.where(since < s.warmup_steps, warm, after)
        return tf.cast(after, dtype)

    def __call__(self, step):
        return self.lr_at(step)

    def get_config(self) -> dict:
        return dict(vars(self.spec))

    @classmethod
    def from_config(cls, config: dict) -> SpecSchedule:
        return cls(ScheduleSpec(**config))


def clip_by_global_norm(grads: Sequence, clip_norm: float) -> list:
    """Scale all gradients by ``clip_norm / max(norm, clip_norm)``, the norm taken in float64."""
    norm = tf.sqrt(
        tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float64))) for g in grads if g is not None])
    )
    scale = clip_norm / tf.maximum(norm, clip_norm)
    return [None if g is None else g * tf.cast(scale, g.dtype) for g in grads]


class SpecOptimizer(keras.optimizers.Optimizer):
    """A Keras optimizer applying an :class:`OptimizerSpec` with a :class:`ScheduleSpec`.

    Slots are named like PyTorch's state (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``,
    ``sum``); :meth:`slot` returns one. Use it like any Keras optimizer (``apply``,
    ``apply_gradients``); the schedule is evaluated at ``iterations`` before the update.

    Args:
        spec: the optimizer.
        schedule: the learning-rate schedule (a spec or a :class:`SpecSchedule`).
        variable_names: (variable, canonical name) of every variable it will update; names
            decide weight-decay masking and LAMB's trust ratio.
        name: the Keras name.
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        schedule: ScheduleSpec | SpecSchedule,
        variable_names: Sequence[tuple[keras.Variable, str]],
        name: str = "spec_optimizer",
    ):
        if isinstance(schedule, ScheduleSpec):
            schedule = SpecSchedule(schedule)
        super().__init__(learning_rate=schedule, name=name)
        self.spec = spec
        self._canonical = {self._var_key(v): n for v, n in variable_names}

    def build(self, variables):
        if self.built:
            return
        unknown = [v.name for v in variables if self._var_key(v) not in self._canonical]
        if unknown:
            raise ValueError(
                f"variables {unknown} have no canonical name; pass them in variable_names"
            )
        super().build(variables)
        self._param_names = [self._canonical[self._var_key(v)] for v in variables]
        self._decays = [self.spec.decays(n) for n in self._param_names]
        self._slot_vars = {
            slot: self.add_optimizer_variables(
                variables, slot, keras.initializers.Constant(self.spec.initial_slot_value(slot))
            )
            for slot in self.spec.slots
        }
        # keras' Constant initializer passes the value through float32; set it exactly.
        for slot, slot_vars in self._slot_vars.items():
            value = self.spec.initial_slot_value(slot)
            for var in slot_vars:
                var.assign(np.full(var.shape, value, dtype=var.dtype))

    def slot(self, slot: str, variable) -> keras.Variable:
        """The optimizer variable ``slot`` (e.g. ``exp_avg``) of a model variable."""
        return self._slot_vars[slot][self._get_variable_index(variable)]

    def apply(self, grads, trainable_variables=None):
        # Dense gradients (Embedding's are IndexedSlices; PyTorch's are dense) and the global
        # clip, which needs every gradient at once, before Keras' per-variable update_step.
        grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
        if self.spec.clip_norm is not None:
            grads = clip_by_global_norm(grads, self.spec.clip_norm)
        return super().apply(grads, trainable_variables)

    def update_step(self, gradient, variable, learning_rate):
        spec = self.spec
        i = self._get_variable_index(variable)
        dtype = variable.dtype

        def c(x):  # a float64 scalar into the parameter's dtype, as numpy casts a Python float
            # tf.cast of a Python float goes through float32 first: make the constant directly.
            return tf.constant(x, dtype) if isinstance(x, float | int) else tf.cast(x, dtype)

        # Keras hands over the rate already cast to float32; recompute it in float64 so that a
        # float64 run is not limited to float32 precision.
        del learning_rate
        lr64 = self._learning_rate.lr_at(self._iterations)
        lr = c(lr64)
        g = c(gradient)
        p = tf.convert_to_tensor(variable)
        wd = spec.weight_decay if self._decays[i] else 0.0

        if spec.name == "sgd":
            g = g + c(wd) * p
            if spec.momentum > 0:
                buf_var = self._slot_vars["momentum_buffer"][i]
                buf = c(spec.momentum) * tf.convert_to_tensor(buf_var) + g
                self.assign(buf_var, buf)
                g = g + c(spec.momentum) * buf if spec.nesterov else buf
            self.assign(variable, p - lr * g)
            return
        if spec.name == "adagrad":
            g = g + c(wd) * p
            acc_var = self._slot_vars["sum"][i]
            acc = tf.convert_to_tensor(acc_var) + g * g
            self.assign(acc_var, acc)
            self.assign(variable, p - lr * g / (tf.sqrt(acc) + c(spec.eps)))
            return
        # Adam family.
        if spec.name == "adam":
            g = g + c(wd) * p
        elif spec.name == "adamw":
            p = p * c(1.0 - lr64 * wd)
        m_var, v_var = self._slot_vars["exp_avg"][i], self._slot_vars["exp_avg_sq"][i]
        m = c(spec.beta1) * tf.convert_to_tensor(m_var) + c(1.0 - spec.beta1) * g
        v = c(spec.beta2) * tf.convert_to_tensor(v_var) + c(1.0 - spec.beta2) * g * g
        self.assign(m_var, m)
        self.assign(v_var, v)
        t = tf.cast(self._iterations + 1, tf.float64)
        m_hat = m / c(1.0 - tf.pow(tf.constant(spec.beta1, tf.float64), t))
        v_hat = v / c(1.0 - tf.pow(tf.constant(spec.beta2, tf.float64), t))
        update = m_hat / (tf.sqrt(v_hat) + c(spec.eps))
        if spec.name == "lamb":
            update = update + c(wd) * p
            if self._decays[i]:
                w_norm, u_norm = tf.norm(p), tf.norm(update)
                ratio = tf.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, tf.ones_like(w_norm))
                lr = lr * ratio
        self.assign(variable, p - lr * update)

    def get_config(self) -> dict:
        raise NotImplementedError(
            "SpecOptimizer is not serialised through Keras; save its canonical state_dict() "
            "instead and rebuild it from the OptimizerSpec"
        )


class _Bound:
    """A :class:`SpecOptimizer` bound to named variables, with the canonical state interface.

    Args:
        spec, schedule: the optimizer and its schedule.
        leaves: the variables with their canonical names and layouts (the adapter's ``Leaf``:
            ``name``, ``variable``, ``spec``, ``to_canonical``, ``from_canonical``).
    """

    def __init__(self, spec: OptimizerSpec, schedule: ScheduleSpec, leaves: Sequence):
        self.spec = spec
        self.schedule = schedule
        self._leaves = list(leaves)
        self.native = SpecOptimizer(spec, schedule, [(lf.variable, lf.name) for lf in leaves])
        self.native.build([lf.variable for lf in self._leaves])

    def _state_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        specs = {"step": ((), "int64")}
        for leaf in self._leaves:
            for slot in self.spec.slots:
                specs[state_key(slot, leaf.name)] = leaf.spec
        return specs

    def state_dict(self) -> dict[str, np.ndarray]:
        """Canonical state: ``step`` (int64) and ``f"{slot}/{name}"`` in canonical layout."""
        state = {"step": np.array(int(self.native.iterations.numpy()), dtype=np.int64)}
        for leaf in self._leaves:
            for slot in self.spec.slots:
                value = self.native.slot(slot, leaf.variable)
                state[state_key(slot, leaf.name)] = leaf.to_canonical(value)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a canonical state (also sets the update count); strict on keys and shapes.

        Values are cast to the slots' dtypes, so a state saved with an int32 step (JAX) loads.

        Raises:
            ValueError: (a ``CheckpointMismatch``) naming every missing, unexpected or
                misshapen key; nothing is loaded then.
        """
        state = {k: np.asarray(v) for k, v in state.items()}
        check_tree(self._state_specs(), state, where="optimizer state", check_dtype=False)
        for leaf in self._leaves:
            for slot in self.spec.slots:
                var = self.native.slot(slot, leaf.variable)
                var.assign(leaf.from_canonical(state[state_key(slot, leaf.name)]).astype(var.dtype))
        self.native.iterations.assign(int(state["step"]))


class Optimizer(_Bound):
    """:func:`make_optimizer`'s result: the optimizer of one model's trainable parameters.

    Attributes:
        native: the :class:`SpecOptimizer` (a ``keras.optimizers.Optimizer``), built.
        model: the model it updates (``train_step`` checks it).
    """

    def __init__(self, spec: OptimizerSpec, schedule: ScheduleSpec, model, leaves: Sequence):
        super().__init__(spec, schedule, leaves)
        self.model = model
        self._train_fn = None  # train_step's cached tf.function


class ArrayOptimizer(_Bound):
    """:func:`make_array_optimizer`'s result: the optimizer over free-standing arrays.

    Args:
        spec, schedule: the optimizer and its schedule.
        leaves: one variable per array, made by the adapter in canonical layout.
    """

    def __init__(self, spec: OptimizerSpec, schedule: ScheduleSpec, leaves: Sequence):
        super().__init__(spec, schedule, leaves)
        self._variables = [leaf.variable for leaf in leaves]
        self._apply = tf.function(lambda grads: self.native.apply(grads, self._variables))

    def params(self) -> dict[str, np.ndarray]:
        """Current parameter values (numpy, their own dtypes)."""
        return {leaf.name: leaf.variable.numpy() for leaf in self._leaves}

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """One update with ``grads`` (same names and shapes as the parameters).

        Raises:
            ValueError: (a ``CheckpointMismatch``) naming every missing, unexpected or
                misshapen gradient; nothing is updated then.
        """
        grads = {k: np.asarray(v) for k, v in grads.items()}
        specs = {leaf.name: leaf.spec for leaf in self._leaves}
        check_tree(specs, grads, where="gradients", check_dtype=False)
        self._apply([tf.cast(grads[leaf.name], leaf.variable.dtype) for leaf in self._leaves])

"""Numpy reference optimizers: the oracle every framework's optimizer is tested against.

Written for clarity, not speed: each rule is the formula of :class:`OptimizerSpec`'s docstring,
computed in the dtype of the parameters (use float64 for tests).
"""

from __future__ import annotations

import numpy as np

from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec, state_key


def global_norm(grads: dict[str, np.ndarray]) -> float:
    """The L2 norm of all gradients together."""
    return float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values())))


def clip_by_global_norm(grads: dict[str, np.ndarray], clip_norm: float) -> dict[str, np.ndarray]:
    """Scale ``grads`` by ``clip_norm / max(norm, clip_norm)`` (TF and optax semantics)."""
    norm = global_norm(grads)
    scale = clip_norm / max(norm, clip_norm)
    return {k: (g * scale).astype(g.dtype) for k, g in grads.items()}


class ReferenceOptimizer:
    """Applies an OptimizerSpec + ScheduleSpec to a dict of numpy parameters.

    Args:
        spec: the optimizer.
        schedule: the learning-rate schedule.
        params: canonical parameter names to arrays; only their names, shapes and dtypes are
            used to create the initial state.
    """

    def __init__(self, spec: OptimizerSpec, schedule: ScheduleSpec, params: dict[str, np.ndarray]):
        self.spec = spec
        self.schedule = schedule
        self.state: dict[str, np.ndarray] = {"step": np.array(0, dtype=np.int64)}
        for name, p in params.items():
            for slot in spec.slots:
                self.state[state_key(slot, name)] = np.full_like(p, spec.initial_slot_value(slot))

    @property
    def step_count(self) -> int:
        return int(self.state["step"])

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the state with a canonical state dict (same keys required)."""
        if set(state) != set(self.state):
            missing = sorted(set(self.state) - set(state))
            extra = sorted(set(state) - set(self.state))
            raise ValueError(f"optimizer state keys differ: missing {missing}, unexpected {extra}")
        self.state = {k: np.array(v, copy=True) for k, v in state.items()}

    def step(
        self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Return the parameters after one update; the state advances in place."""
        spec = self.spec
        if spec.clip_norm is not None:
            grads = clip_by_global_norm(grads, spec.clip_norm)
        t = self.step_count + 1
        lr = self.schedule.lr_at(t - 1)
        new_params = {}
        for name, p in params.items():
            g = grads[name]
            wd = spec.weight_decay if spec.decays(name) else 0.0
            new_params[name] = self._update(name, p, g, lr, wd, t).astype(p.dtype)
        self.state["step"] = np.array(t, dtype=np.int64)
        return new_params

    def _slot(self, slot: str, name: str) -> np.ndarray:
        return self.state[state_key(slot, name)]

    def _set(self, slot: str, name: str, value: np.ndarray) -> None:
        self.state[state_key(slot, name)] = value.astype(self.state[state_key(slot, name)].dtype)

    def _update(self, name, p, g, lr, wd, t):
        spec = self.spec
        if spec.name == "sgd":
            g = g + wd * p
            if spec.momentum > 0:
                buf = spec.momentum * self._slot("momentum_buffer", name) + g
                self._set("momentum_buffer", name, buf)
                g = g + spec.momentum * buf if spec.nesterov else buf
            return p - lr * g
        if spec.name == "adagrad":
            g = g + wd * p
            acc = self._slot("sum", name) + g * g
            self._set("sum", name, acc)
            return p - lr * g / (np.sqrt(acc) + spec.eps)
        # Adam family.
        if spec.name == "adam":
            g = g + wd * p
        elif spec.name == "adamw":
            p = p * (1.0 - lr * wd)
        m = spec.beta1 * self._slot("exp_avg", name) + (1.0 - spec.beta1) * g
        v = spec.beta2 * self._slot("exp_avg_sq", name) + (1.0 - spec.beta2) * g * g
        self._set("exp_avg", name, m)
        self._set("exp_avg_sq", name, v)
        m_hat = m / (1.0 - spec.beta1**t)
        v_hat = v / (1.0 - spec.beta2**t)
        update = m_hat / (np.sqrt(v_hat) + spec.eps)
        if spec.name != "lamb":
            return p - lr * update
        update = update + wd * p
        ratio = 1.0
        if spec.decays(name):
            w_norm = np.linalg.norm(p)
            u_norm = np.linalg.norm(update)
            if w_norm > 0 and u_norm > 0:
                ratio = w_norm / u_norm
        return p - lr * ratio * update

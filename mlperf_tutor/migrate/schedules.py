"""PyTorch LR schedulers as traceable functions of the scheduler's epoch, or host-side rates.

``torch.optim.lr_scheduler`` mostly updates ``group["lr"]`` recursively (it multiplies the
current value). A jitted JAX step can't carry that Python state, so every supported scheduler is
written here in closed form, as a function of ``last_epoch`` (an int32 array) that ``jax.jit``
can trace. Where torch has a ``_get_closed_form_lr`` the formula is torch's; the recursive values
torch produces differ from it by round-off only.

Two kinds of schedule stay on the host, in Python, and their rate is fed to the jitted step each
step (:class:`mlperf_tutor.migrate.optim.HostRates`): a ``LambdaLR`` lambda that JAX can't trace
(``math.cos``, ``min``, ``if`` on the epoch, as in transformers' ``get_*_schedule_with_warmup``
and nanoGPT's ``get_lr``), evaluated on the integer epoch exactly as torch does, and
``ReduceLROnPlateau``, which follows the losses (:class:`Plateau`).

The convention (torch's): ``optimizer.step()`` uses ``group["lr"]``, then ``scheduler.step()``
moves ``last_epoch`` one on. So the ``k``-th update after a conversion at ``last_epoch = E``
uses the rate at epoch ``E + k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

SUPPORTED_SCHEDULERS = (
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "PolynomialLR",
    "CosineAnnealingLR",
    "OneCycleLR",
    "SequentialLR",
    "LambdaLR",
    "ReduceLROnPlateau",
)

Schedule = Callable[[jax.Array], jax.Array]


class GroupSchedule(NamedTuple):
    """The hyperparameters a scheduler moves for one param group, as functions of the epoch.

    Attributes:
        lr: epoch -> learning rate, traceable; None when the rate comes from the host.
        momentum: epoch -> SGD/RMSprop ``momentum`` or Adam's ``beta1``; only for
            ``OneCycleLR(cycle_momentum=True)``, else None (the group's value is constant).
        host_lr: with ``lr`` None, the Python function ``int epoch -> float rate`` evaluated
            on the host (a LambdaLR lambda JAX can't trace, or a SequentialLR holding one);
            None with ``lr`` None too means ReduceLROnPlateau (the rate follows the losses).
    """

    lr: Schedule | None
    momentum: Schedule | None = None
    host_lr: Callable[[int], float] | None = None

    @property
    def on_host(self) -> bool:
        """Whether the rate is computed on the host rather than inside the jitted step."""
        return self.lr is None

    def rate_at(self, epoch: int) -> float:
        """The rate at ``epoch``, as a Python float (not for ReduceLROnPlateau)."""
        if self.lr is not None:
            return float(self.lr(jnp.asarray(epoch, jnp.int32)))
        if self.host_lr is None:
            raise ValueError("ReduceLROnPlateau's rate follows the losses, not the epoch.")
        return self.host_lr(epoch)


def _real(t: jax.Array) -> jax.Array:
    # The default float dtype: float64 under jax_enable_x64, as Python floats are in torch.
    return jnp.asarray(t).astype(jax.dtypes.canonicalize_dtype(jnp.float64))


def constant(value: float) -> Schedule:
    """A schedule that is ``value`` at every epoch."""
    return lambda t: jnp.full((), value, _real(t).dtype)


# Torch computes its rates in Python float64. In float32 the textbook formulas lose digits where
# a rate nears its floor (1 - t/T, 1 + cos(pi t/T) near t = T; gamma**t rounds gamma first), so
# the helpers below keep ~1e-7 relative accuracy all the way down.


def _pow(gamma: float, k: jax.Array) -> jax.Array:
    """``gamma ** k`` from log(gamma) in double: a rounded gamma would be off k-fold."""
    if gamma <= 0.0:
        return jnp.power(gamma, k)
    return jnp.exp(k * math.log(gamma))


def _fractions(t: jax.Array, a: float, b: float) -> tuple[jax.Array, jax.Array]:
    """``((t - a) / (b - a), (b - t) / (b - a))``, each accurate also when it is near 0."""
    a_hi, b_hi = math.floor(a), math.floor(b)
    # t - a_hi and b_hi - t are exact; the fractional parts are added in afterwards.
    done = (t - a_hi) - (a - a_hi)
    left = (b_hi - t) + (b - b_hi)
    return done / (b - a), left / (b - a)


def _half_cos(left: jax.Array) -> jax.Array:
    """``(1 + cos(pi * (1 - left))) / 2`` = ``sin(pi * left / 2) ** 2``, accurate near 0."""
    return jnp.square(jnp.sin(math.pi / 2 * left))


def _step(s, base: float) -> Schedule:
    return lambda t: base * _pow(s.gamma, _real(jnp.asarray(t) // s.step_size))


def _multistep(s, base: float) -> Schedule:
    # bisect_right(milestones, t) with repeats counted, as torch's Counter of milestones does.
    milestones = sorted(s.milestones.elements())

    def lr(t):
        passed = sum((jnp.asarray(t) >= m).astype(jnp.int32) for m in milestones)
        return base * _pow(s.gamma, _real(passed))

    return lr


def _constant_lr(s, base: float) -> Schedule:
    return lambda t: base * jnp.where(jnp.asarray(t) >= s.total_iters, 1.0, s.factor)


def _linear(s, base: float) -> Schedule:
    def lr(t):
        done, left = _fractions(jnp.minimum(_real(t), s.total_iters), 0.0, s.total_iters)
        return base * (s.start_factor * left + s.end_factor * done)

    return lr


def _exponential(s, base: float) -> Schedule:
    return lambda t: base * _pow(s.gamma, _real(t))


def _polynomial(s, base: float) -> Schedule:
    def lr(t):
        _, left = _fractions(jnp.minimum(_real(t), s.total_iters), 0.0, s.total_iters)
        return base * jnp.power(left, s.power)

    return lr


def _cosine(s, base: float) -> Schedule:
    # Torch's recursive form is periodic past T_max (period 2 T_max); so is this closed form.
    # Reducing an integer epoch modulo the period first keeps the sine's argument small.
    period = 2 * s.T_max if float(s.T_max).is_integer() else None

    def lr(t):
        t = jnp.asarray(t)
        if period is not None and jnp.issubdtype(t.dtype, jnp.integer):
            t = t % period
        _, left = _fractions(_real(t), 0.0, s.T_max)
        return s.eta_min + (base - s.eta_min) * _half_cos(left)

    return lr


def _lambda(base: float, fn: Callable) -> GroupSchedule:
    """A LambdaLR group: traced when ``fn`` traces to a scalar, else evaluated on the host."""
    try:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct((), jnp.int32))
        traces = getattr(out, "shape", None) == ()
    except Exception:  # noqa: BLE001 - whatever the lambda does to a tracer, the host path works
        traces = False
    if traces:
        return GroupSchedule(lambda t: base * _real(fn(jnp.asarray(t, jnp.int32))))

    def host_lr(epoch: int) -> float:
        # torch's LambdaLR.get_lr: base_lr * lmbda(last_epoch), in Python floats.
        try:
            return float(base * fn(epoch))
        except Exception as err:
            raise ValueError(
                f"LambdaLR: lr_lambda {fn!r} failed at epoch {epoch} ({type(err).__name__}: "
                f"{err}); it must map an int epoch to a float factor, as torch calls it."
            ) from err

    return GroupSchedule(None, host_lr=host_lr)


def _one_cycle(s, group: dict) -> GroupSchedule:
    kind = getattr(s, "_anneal_func_type", None)
    if kind not in ("cos", "linear"):
        raise ValueError(f"OneCycleLR: unknown anneal strategy {kind!r} (expected cos or linear).")

    def anneal(start, end, done, left):
        if kind == "cos":
            return end + (start - end) * _half_cos(left)
        return start * left + end * done

    def piecewise(start_key: str, end_key: str) -> Schedule:
        # Torch takes the first phase whose end_step >= t, the last one otherwise; past
        # total_steps torch raises, this extrapolates the last phase.
        phases = s._schedule_phases

        def value(t):
            t = _real(t)
            out = None
            starts = [0.0] + [float(p["end_step"]) for p in phases[:-1]]
            for i in reversed(range(len(phases))):
                p, start = phases[i], starts[i]
                done, left = _fractions(t, start, float(p["end_step"]))
                v = anneal(float(group[p[start_key]]), float(group[p[end_key]]), done, left)
                out = v if out is None else jnp.where(t <= p["end_step"], v, out)
            return out

        return value

    momentum = None
    if s.cycle_momentum:
        momentum = piecewise("start_momentum", "end_momentum")
    return GroupSchedule(piecewise("start_lr", "end_lr"), momentum)


def _sequential(s, optimizer) -> list[GroupSchedule]:
    if any(type(sub) is type(s) for sub in s._schedulers):
        # Torch's constructor "undoes" the children's first steps recursively and re-steps the
        # inner SequentialLR, which shifts its epochs (measured: ConstantLR(0.5, 2) inside gives
        # 0.5, 1.0, ... instead of 0.5, 0.5, 1.0); no closed form reproduces that.
        raise ValueError(
            "SequentialLR inside SequentialLR is not supported (torch shifts the inner "
            "schedulers' epochs): list all the schedulers in one SequentialLR."
        )
    if any(type(sub).__name__ == "ReduceLROnPlateau" for sub in s._schedulers):
        raise ValueError(
            "SequentialLR containing ReduceLROnPlateau is not supported (torch's SequentialLR "
            "steps it without a metric): use ReduceLROnPlateau alone."
        )
    inner = [group_schedules(sub, optimizer) for sub in s._schedulers]
    if any(g.momentum is not None for groups in inner for g in groups):
        raise ValueError(
            "SequentialLR containing OneCycleLR(cycle_momentum=True) is not supported: "
            "build that OneCycleLR with cycle_momentum=False."
        )
    starts = [0, *s._milestones]

    def piecewise(parts: Sequence[Schedule]) -> Schedule:
        # At milestone m torch restarts the next scheduler at epoch 0 (`_update_lr(0)`).
        def lr(t):
            t = jnp.asarray(t)
            out = parts[0](t)
            for part, start in zip(parts[1:], starts[1:], strict=True):
                out = jnp.where(t >= start, part(jnp.maximum(t - start, 0)), out)
            return out

        return lr

    def host_piecewise(parts: Sequence[GroupSchedule]) -> Callable[[int], float]:
        def host_lr(epoch: int) -> float:
            i = sum(epoch >= start for start in starts[1:])
            return parts[i].rate_at(max(epoch - starts[i], 0))

        return host_lr

    out = []
    for i in range(len(optimizer.param_groups)):
        parts = [groups[i] for groups in inner]
        if any(part.on_host for part in parts):
            out.append(GroupSchedule(None, host_lr=host_piecewise(parts)))
        else:
            out.append(GroupSchedule(piecewise([part.lr for part in parts])))
    return out


class Plateau:
    """``ReduceLROnPlateau`` on the host: torch's rule, its state converted from torch's.

    ``step(metric)`` is torch's ``scheduler.step(metric)``, called after the optimizer step;
    ``lrs`` are the param groups' rates the next optimizer step uses (Python floats, multiplied
    as torch multiplies ``group["lr"]``, so they are torch's to the last bit).
    """

    def __init__(self, scheduler, optimizer):
        s = scheduler
        n = len(optimizer.param_groups)
        min_lrs = list(s.min_lrs)
        if len(min_lrs) != n:
            if s.default_min_lr is None:
                raise ValueError(
                    f"ReduceLROnPlateau has {len(min_lrs)} min_lrs for {n} param groups: set "
                    "scheduler.min_lrs to one value per param group."
                )
            min_lrs = [s.default_min_lr] * n
        self.min_lrs = [float(m) for m in min_lrs]
        # The hyperparameters and the position, under torch's attribute names.
        self.mode: str = s.mode
        self.threshold: float = s.threshold
        self.threshold_mode: str = s.threshold_mode
        self.factor: float = s.factor
        self.patience: int = s.patience
        self.cooldown: int = s.cooldown
        self.eps: float = s.eps
        self.best: float = s.best
        self.num_bad_epochs: int = s.num_bad_epochs
        self.cooldown_counter: int = s.cooldown_counter
        self.last_epoch: int = s.last_epoch
        self.lrs = [float(g["lr"]) for g in optimizer.param_groups]

    def _is_better(self, a: float) -> bool:
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return a < self.best * (1.0 - self.threshold)
            return a < self.best - self.threshold
        if self.threshold_mode == "rel":
            return a > self.best * (self.threshold + 1.0)
        return a > self.best + self.threshold

    def step(self, metric: float) -> None:
        current = float(metric)
        self.last_epoch += 1
        if self._is_better(current):
            self.best, self.num_bad_epochs = current, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in cooldown don't count, as in torch
        if self.num_bad_epochs > self.patience:
            for i, old in enumerate(self.lrs):
                new = max(old * self.factor, self.min_lrs[i])
                if old - new > self.eps:
                    self.lrs[i] = new
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0


_PER_BASE_LR: dict[str, Callable[[Any, float], Schedule]] = {
    "StepLR": _step,
    "MultiStepLR": _multistep,
    "ConstantLR": _constant_lr,
    "LinearLR": _linear,
    "ExponentialLR": _exponential,
    "PolynomialLR": _polynomial,
    "CosineAnnealingLR": _cosine,
}


def group_schedules(scheduler, optimizer) -> list[GroupSchedule]:
    """One :class:`GroupSchedule` per param group of ``optimizer``, following ``scheduler``.

    Args:
        scheduler: a ``torch.optim.lr_scheduler`` object of a class in ``SUPPORTED_SCHEDULERS``
            (exact class), attached to ``optimizer``.
        optimizer: the ``torch.optim.Optimizer`` it drives.

    Raises:
        ValueError: unsupported scheduler, a scheduler of another optimizer, or a nesting torch
            itself runs differently from its parts (see ``_sequential``).
    """
    kind = type(scheduler).__name__
    if not is_supported(scheduler):
        raise ValueError(
            f"Can't convert the LR scheduler {type(scheduler).__module__}."
            f"{type(scheduler).__qualname__} to optax. Supported schedulers "
            f"(torch.optim.lr_scheduler, exact classes): {', '.join(SUPPORTED_SCHEDULERS)}."
        )
    if scheduler.optimizer is not optimizer:
        raise ValueError(f"{kind} is attached to another optimizer than the one converted.")
    groups = optimizer.param_groups
    if kind in _PER_BASE_LR:
        build = _PER_BASE_LR[kind]
        return [GroupSchedule(build(scheduler, float(b))) for b in scheduler.base_lrs]
    if kind == "LambdaLR":
        return [
            _lambda(float(b), fn)
            for b, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
    if kind == "ReduceLROnPlateau":
        return [GroupSchedule(None) for _ in groups]
    if kind == "OneCycleLR":
        return [_one_cycle(scheduler, g) for g in groups]
    return _sequential(scheduler, optimizer)


def is_supported(scheduler) -> bool:
    """Whether ``scheduler``'s class is in ``SUPPORTED_SCHEDULERS``, exactly: a subclass may
    change the rule."""
    import torch.optim.lr_scheduler as lrs

    kind = type(scheduler).__name__
    return kind in SUPPORTED_SCHEDULERS and type(scheduler) is getattr(lrs, kind)

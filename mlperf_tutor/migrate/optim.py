"""A ``torch.optim`` optimizer (and LR scheduler) as an optax transformation, state included.

:func:`convert_optimizer` reads a live PyTorch optimizer, possibly mid-training, and returns an
``optax.GradientTransformation`` over a flat ``dict[str, array]`` keyed by canonical parameter
name, plus its state converted from ``optimizer.state`` (moments, accumulators, momentum
buffers, step counts) and from the scheduler's position. Applying ``tx.update`` then
``optax.apply_updates`` step by step gives the parameters that continuing ``optimizer.step();
scheduler.step()`` gives in PyTorch, to float32 round-off.

The update rules are written here, after torch's single-tensor (``foreach=False``) code paths,
rather than composed from optax's built-ins, because torch differs in small ways that show up in
a parity test: SGD's momentum buffer starts at the first gradient, Adam's bias corrections use
each parameter's own step count (computed with ``expm1``, as accurate as torch's Python floats),
Adagrad adds ``eps`` outside the square root and decays its rate with ``lr_decay``, RMSprop's
momentum buffer accumulates ``g / avg``. Hyperparameters are per param group, as in torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mlperf_tutor.core.parity import STEP_RTOL
from mlperf_tutor.migrate.schedules import (
    SUPPORTED_SCHEDULERS,
    GroupSchedule,
    constant,
    group_schedules,
    is_supported,
)

SUPPORTED_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop")

__all__ = ["SUPPORTED_OPTIMIZERS", "SUPPORTED_SCHEDULERS", "TorchOptimState", "convert_optimizer"]


class TorchOptimState(NamedTuple):
    """Optax state of a converted torch optimizer; slot names are torch's ``optimizer.state`` keys.

    Attributes:
        count: int32 scalar, the LR schedule's position: the torch scheduler's ``last_epoch``
            at conversion (0 without a scheduler, and after ``tx.init``), plus one per update.
        lr: per param group, the learning rate the next update uses (torch's ``group["lr"]``
            after ``scheduler.step()``); for logging, the update recomputes it from ``count``.
        step: per parameter name, torch's ``state["step"]`` (float32 scalar). SGD keeps no step
            in torch: here it is 0 until the momentum buffer exists, then counts updates.
        slots: torch state name (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
            ``momentum_buffer``, ``sum``, ``square_avg``, ``grad_avg``) -> {param name: array}.
    """

    count: jax.Array
    lr: tuple[jax.Array, ...]
    step: dict[str, jax.Array]
    slots: dict[str, dict[str, jax.Array]]


class _Group(NamedTuple):
    names: tuple[str, ...]
    hp: dict[str, Any]  # static hyperparameters (Python floats/bools)
    schedule: GroupSchedule
    slots: tuple[str, ...]


def _lerp(a, b, w):
    # torch's CPU lerp: two formulas, picked by |w| < 0.5, so round-off matches.
    if isinstance(w, float):
        return a + w * (b - a) if abs(w) < 0.5 else b - (b - a) * (1.0 - w)
    return jnp.where(jnp.abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


def _sgd(g, p, s, step, hp, lr, mom):
    if hp["weight_decay"]:
        g = g + hp["weight_decay"] * p
    if "momentum_buffer" not in s:
        return -lr * g, s, step + 1
    old = s["momentum_buffer"]
    # Torch starts the buffer at the first gradient, not at zero (step 0 = no buffer yet).
    buf = jnp.where(step == 0, g, old * mom + (1.0 - hp["dampening"]) * g)
    d = g + mom * buf if hp["nesterov"] else buf
    if isinstance(mom, float):
        return -lr * d, {"momentum_buffer": buf}, step + 1
    # A cycled momentum can pass through 0, where torch skips the buffer for that step.
    on = mom != 0
    new = {"momentum_buffer": jnp.where(on, buf, old)}
    return -lr * jnp.where(on, d, g), new, step + on.astype(step.dtype)


def _adam(g, p, s, step, hp, lr, b1):
    step = step + 1
    wd, b2 = hp["weight_decay"], hp["beta2"]
    if wd and not hp["decoupled_weight_decay"]:
        g = g + wd * p
    m = _lerp(s["exp_avg"], g, 1.0 - b1)
    v = s["exp_avg_sq"] * b2 + (1.0 - b2) * g * g
    new = {"exp_avg": m, "exp_avg_sq": v}
    # 1 - b**t with b rounded to float32 loses ~1e-5 for b2 = 0.999; expm1 keeps torch's digits.
    log_b1 = math.log(b1) if isinstance(b1, float) else jnp.log(b1)
    c1, c2 = -jnp.expm1(step * log_b1), -jnp.expm1(step * math.log(b2))
    if hp["amsgrad"]:
        v = new["max_exp_avg_sq"] = jnp.maximum(s["max_exp_avg_sq"], v)
    denom = jnp.sqrt(v) / jnp.sqrt(c2) + hp["eps"]
    u = -(lr / c1) * m / denom
    if wd and hp["decoupled_weight_decay"]:
        # Torch scales p by (1 - lr * wd) first; p * c - p is exact (Sterbenz), so p + u rounds
        # like torch's two in-place ops up to one final rounding.
        u = (p * (1.0 - lr * wd) - p) + u
    return u, new, step


def _adagrad(g, p, s, step, hp, lr, mom):
    del mom
    step = step + 1
    if hp["weight_decay"]:
        g = g + hp["weight_decay"] * p
    clr = lr / (1.0 + (step - 1.0) * hp["lr_decay"])
    acc = s["sum"] + g * g
    return -clr * g / (jnp.sqrt(acc) + hp["eps"]), {"sum": acc}, step


def _rmsprop(g, p, s, step, hp, lr, mom):
    step = step + 1
    alpha = hp["alpha"]
    if hp["weight_decay"]:
        g = g + hp["weight_decay"] * p
    sq = s["square_avg"] * alpha + (1.0 - alpha) * g * g
    new = {"square_avg": sq}
    if hp["centered"]:
        ga = new["grad_avg"] = _lerp(s["grad_avg"], g, 1.0 - alpha)
        avg = jnp.sqrt(sq - ga * ga) + hp["eps"]
    else:
        avg = jnp.sqrt(sq) + hp["eps"]
    if "momentum_buffer" not in s:
        return -lr * g / avg, new, step
    old = s["momentum_buffer"]
    buf = old * mom + g / avg
    if isinstance(mom, float):
        new["momentum_buffer"] = buf
        return -lr * buf, new, step
    on = mom > 0
    new["momentum_buffer"] = jnp.where(on, buf, old)
    return jnp.where(on, -lr * buf, -lr * g / avg), new, step


# name -> (update rule, hyperparameter keys read from the torch param group)
_RULES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "SGD": (_sgd, ("momentum", "dampening", "nesterov", "weight_decay")),
    "Adam": (_adam, ("betas", "eps", "weight_decay", "amsgrad")),
    "Adagrad": (_adagrad, ("lr_decay", "eps", "weight_decay", "initial_accumulator_value")),
    "RMSprop": (_rmsprop, ("alpha", "eps", "weight_decay", "momentum", "centered")),
}
_RULES["AdamW"] = _RULES["Adam"]


def _scalar(x):
    return x.item() if hasattr(x, "item") else x


def _hyper(kind: str, group: dict) -> dict[str, Any]:
    hp = {k: _scalar(group[k]) for k in _RULES[kind][1]}
    hp["maximize"] = bool(group.get("maximize", False))
    if kind in ("Adam", "AdamW"):
        b1, b2 = (float(_scalar(b)) for b in hp.pop("betas"))
        hp.update(beta1=b1, beta2=b2)
        hp["decoupled_weight_decay"] = bool(group.get("decoupled_weight_decay", kind == "AdamW"))
    return {k: v if isinstance(v, bool) else float(v) for k, v in hp.items()}


def _momentum_key(kind: str) -> str | None:
    return {"SGD": "momentum", "RMSprop": "momentum", "Adagrad": None}.get(kind, "beta1")


def _slots(kind: str, hp: dict, cycled: bool) -> tuple[str, ...]:
    if kind == "SGD":
        return ("momentum_buffer",) if hp["momentum"] != 0 or cycled else ()
    if kind == "Adagrad":
        return ("sum",)
    if kind == "RMSprop":
        out = ("square_avg",)
        out += ("momentum_buffer",) if hp["momentum"] > 0 or cycled else ()
        return out + (("grad_avg",) if hp["centered"] else ())
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ())


def _fresh(slot: str, hp: dict, shape, dtype) -> jax.Array:
    value = hp["initial_accumulator_value"] if slot == "sum" else 0.0
    return jnp.full(shape, value, dtype)


def _transformation(kind: str, groups: list[_Group]) -> optax.GradientTransformation:
    rule = _RULES[kind][0]
    mkey = _momentum_key(kind)
    managed = {n for grp in groups for n in grp.names}

    def lrs(count):
        return tuple(grp.schedule.lr(count) for grp in groups)

    def init(params: Mapping[str, jax.Array]) -> TorchOptimState:
        slots: dict[str, dict[str, jax.Array]] = {}
        for grp in groups:
            for slot in grp.slots:
                for n in grp.names:
                    arr = params[n]
                    slots.setdefault(slot, {})[n] = _fresh(slot, grp.hp, arr.shape, arr.dtype)
        count = jnp.zeros([], jnp.int32)
        step = {n: jnp.zeros([], jnp.float32) for n in managed}
        return TorchOptimState(count, lrs(count), step, slots)

    def update(updates, state: TorchOptimState, params=None):
        missing = sorted(managed - set(updates))
        if missing:
            raise ValueError(f"convert_optimizer's update: no gradient for {missing}.")
        needs_params = any(grp.hp["weight_decay"] for grp in groups)
        if needs_params and params is None:
            raise ValueError("Weight decay needs the params: tx.update(grads, state, params).")
        # Names the torch optimizer didn't hold are not updated, as in torch.
        out = {n: jnp.zeros_like(g) for n, g in updates.items() if n not in managed}
        step = dict(state.step)
        slots = {slot: dict(per) for slot, per in state.slots.items()}
        for grp in groups:
            lr = grp.schedule.lr(state.count)
            mom = grp.hp.get(mkey) if mkey else None
            if grp.schedule.momentum is not None:
                mom = grp.schedule.momentum(state.count)
            for n in grp.names:
                g = updates[n]
                dt = jnp.promote_types(g.dtype, jnp.float32)
                g = -g.astype(dt) if grp.hp["maximize"] else g.astype(dt)
                p = None if params is None else params[n].astype(dt)
                m = mom if mom is None or isinstance(mom, float) else mom.astype(dt)
                s = {slot: slots[slot][n] for slot in grp.slots}
                u, s, step[n] = rule(g, p, s, step[n], grp.hp, lr.astype(dt), m)
                out[n] = u.astype(updates[n].dtype)
                for slot, value in s.items():  # state keeps its dtype (torch's: the param's)
                    slots[slot][n] = value.astype(slots[slot][n].dtype)
        count = optax.safe_int32_increment(state.count)
        return out, TorchOptimState(count, lrs(count), step, slots)

    return optax.GradientTransformation(init, update)


def _to_jax(t) -> jax.Array:
    import torch

    # A copy: torch keeps updating its state in place, which must not reach the JAX arrays.
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return jnp.array(t.float().numpy(), copy=True).astype(jnp.bfloat16)
    return jnp.array(t.numpy(), copy=True)


def _check_position(kind: str, gi: int, group: dict, hp: dict, sched: GroupSchedule, epoch: int):
    # A mismatch means the conversion would silently change the training: group["lr"] was set
    # by hand, or a second scheduler steps this optimizer.
    def check(what: str, torch_value: float, ours: Callable):
        got = float(ours(jnp.asarray(epoch, jnp.int32)))
        # Within the parity bar of parameters: a larger gap would show in them.
        if not math.isclose(got, torch_value, rel_tol=STEP_RTOL, abs_tol=1e-10):
            raise ValueError(
                f"{kind} param group {gi}: {what} is {torch_value} but the scheduler at "
                f"last_epoch={epoch} gives {got}. Was it set outside the scheduler, or does a "
                "second scheduler step this optimizer? Pass the one scheduler that drives it "
                "(SequentialLR to chain several; OneCycleLR inside SequentialLR also disagrees "
                "with itself in torch)."
            )

    check("lr", float(_scalar(group["lr"])), sched.lr)
    if sched.momentum is not None:
        mkey = _momentum_key(kind)
        check(mkey, hp[mkey], sched.momentum)


def _param_state(name: str, p, st: dict, hp: dict, slots: tuple[str, ...]):
    """(step, {slot: array}) of one parameter from its torch ``optimizer.state[p]``."""
    has_buf = st.get("momentum_buffer") is not None
    step = jnp.asarray(float(_scalar(st.get("step", 1.0 if has_buf else 0.0))), jnp.float32)
    out = {}
    for slot in slots:
        value = st.get(slot)
        if value is None:  # not stepped yet (or SGD's buffer before its first step)
            dtype = jnp.dtype(str(p.dtype).removeprefix("torch."))
            out[slot] = _fresh(slot, hp, tuple(p.shape), dtype)
            continue
        out[slot] = _to_jax(value)
        if out[slot].shape != tuple(p.shape):
            raise ValueError(f"{name}: state[{slot!r}] has shape {out[slot].shape}, not {p.shape}.")
    return step, out


def _unsupported_message(optimizer=None, scheduler=None) -> str:
    """The one error message for an optimizer or LR scheduler this module can't convert: it
    lists every supported class of both, whichever of the two was refused."""
    what = optimizer if optimizer is not None else scheduler
    kind = "optimizer" if optimizer is not None else "LR scheduler"
    return (
        f"Can't convert the {kind} {type(what).__module__}.{type(what).__qualname__} to optax. "
        f"Supported optimizers (torch.optim, exact classes): {', '.join(SUPPORTED_OPTIMIZERS)}. "
        f"Supported schedulers (torch.optim.lr_scheduler, stepped once per optimizer step): "
        f"{', '.join(SUPPORTED_SCHEDULERS)}."
    )


def convert_optimizer(
    optimizer, names: Mapping[int, str], scheduler=None
) -> tuple[optax.GradientTransformation, TorchOptimState]:
    """The optax twin of a torch optimizer (and scheduler), with its current state.

    Args:
        optimizer: a ``torch.optim`` optimizer of a class in ``SUPPORTED_OPTIMIZERS`` (exact
            class; subclasses may change ``step`` and are refused), fresh or already stepped.
        names: ``id(param) -> canonical name`` for every parameter in the optimizer's param
            groups that requires grad. Other names (extra entries, or parameters with
            ``requires_grad=False``, which torch never steps) get zero updates.
        scheduler: the ``torch.optim.lr_scheduler`` object driving ``optimizer``, stepped once
            per optimizer step after it; a class in ``SUPPORTED_SCHEDULERS``.

    Returns:
        ``(tx, opt_state)``: ``tx`` works on flat ``{name: array}`` dicts of grads and params
        (``tx.update(grads, opt_state, params)``, then ``optax.apply_updates``); ``opt_state``
        is a :class:`TorchOptimState` continuing from the optimizer's and scheduler's position.
        ``tx.init(params)`` gives the state of a fresh optimizer at schedule position 0.

    Raises:
        ValueError: an unsupported optimizer or scheduler (listing the supported ones), a
            parameter missing from ``names``, complex parameters, a LambdaLR lambda JAX can't
            trace, or a ``group["lr"]`` that disagrees with the scheduler.
    """
    import torch

    kind = type(optimizer).__name__
    if kind not in SUPPORTED_OPTIMIZERS or type(optimizer) is not getattr(torch.optim, kind):
        raise ValueError(_unsupported_message(optimizer=optimizer))
    if scheduler is not None and not is_supported(scheduler):
        raise ValueError(_unsupported_message(scheduler=scheduler))
    if scheduler is None:
        epoch = 0
        scheds = [GroupSchedule(constant(float(_scalar(g["lr"])))) for g in optimizer.param_groups]
    else:
        scheds = group_schedules(scheduler, optimizer)
        epoch = int(scheduler.last_epoch)

    groups, step, slots = [], {}, {}
    for gi, (group, sched) in enumerate(zip(optimizer.param_groups, scheds, strict=True)):
        hp = _hyper(kind, group)
        _check_position(kind, gi, group, hp, sched, epoch)
        group_slots = _slots(kind, hp, sched.momentum is not None)
        group_names = []
        for p in group["params"]:
            if not p.requires_grad:
                continue  # torch never steps it (its grad stays None): left out, zero updates
            if id(p) not in names:
                raise ValueError(
                    f"{kind} param group {gi} holds a parameter of shape {tuple(p.shape)} that "
                    "is not in `names` (id(param) -> name); pass every optimized parameter."
                )
            name = names[id(p)]
            if p.is_complex():
                raise ValueError(f"{name}: complex parameters are not supported.")
            group_names.append(name)
            step[name], per_slot = _param_state(
                name, p, optimizer.state.get(p, {}), hp, group_slots
            )
            for slot, value in per_slot.items():
                slots.setdefault(slot, {})[name] = value
        groups.append(_Group(tuple(group_names), hp, sched, group_slots))

    tx = _transformation(kind, groups)
    count = jnp.asarray(epoch, jnp.int32)
    lr = tuple(grp.schedule.lr(count) for grp in groups)
    return tx, TorchOptimState(count, lr, step, slots)

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
momentum buffer accumulates ``g / avg``, NAdam keeps a per-parameter ``mu_product``, RAdam
rectifies with ``rho_t``, Adafactor scales by the parameter's RMS and clips by the update's.
Hyperparameters are per param group, as in torch.

Learning rates a jitted step can't compute (a ``LambdaLR`` lambda with Python ``math`` or
branches, ``ReduceLROnPlateau``) are computed on the host by :class:`HostRates`, which
:func:`host_rates` builds. The ordering convention is torch's: ``optimizer.step()`` uses
``group["lr"]``, then ``scheduler.step()`` (``scheduler.step(loss)`` for ReduceLROnPlateau)
moves it. A loop over the converted step is::

    rates = host_rates(optimizer, scheduler)  # None when every rate traces
    for batch in batches:
        if rates is not None:
            opt_state = rates.before_step(opt_state)  # writes the rate of this step
        loss, grads = value_and_grad(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if rates is not None:
            rates.after_step(float(loss) if rates.needs_loss else None)
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
    Plateau,
    constant,
    group_schedules,
    is_supported,
)

SUPPORTED_OPTIMIZERS = (
    "SGD",
    "Adam",
    "AdamW",
    "Adagrad",
    "RMSprop",
    "NAdam",
    "RAdam",
    "Adamax",
    "Adafactor",
)

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "SUPPORTED_SCHEDULERS",
    "HostRates",
    "TorchOptimState",
    "convert_optimizer",
    "host_rates",
]


class TorchOptimState(NamedTuple):
    """Optax state of a converted torch optimizer; slot names are torch's ``optimizer.state`` keys.

    Attributes:
        count: int32 scalar, the LR schedule's position: the torch scheduler's ``last_epoch``
            at conversion (0 without a scheduler, and after ``tx.init``), plus one per update.
        lr: per param group, the learning rate the next update uses (torch's ``group["lr"]``
            after ``scheduler.step()``). For a traced schedule it is for logging: the update
            recomputes it from ``count``. For a host-side group (see :func:`host_rates`) the
            update reads it: :meth:`HostRates.before_step` writes it before each update, and
            the update leaves NaN in its place, so a step run without ``before_step`` gives NaN
            parameters instead of silently reusing a stale rate.
        step: per parameter name, torch's ``state["step"]`` (float32 scalar). SGD keeps no step
            in torch: here it is 0 until the momentum buffer exists, then counts updates.
        slots: torch state name (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
            ``momentum_buffer``, ``sum``, ``square_avg``, ``grad_avg``, ``mu_product``,
            ``exp_inf``, ``row_var``, ``col_var``, ``variance``) -> {param name: array}, each
            of torch's shape (NAdam's ``mu_product`` is a float32 scalar, Adafactor's
            ``row_var``/``col_var`` have a 1 in the last/second-last dimension).
    """

    count: jax.Array
    lr: tuple[jax.Array, ...]
    step: dict[str, jax.Array]
    slots: dict[str, dict[str, jax.Array]]


class _Group(NamedTuple):
    names: tuple[str, ...]
    hp: dict[str, Any]  # static hyperparameters (Python floats/bools)
    schedule: GroupSchedule
    slots: tuple[str, ...]  # a parameter holds those of them _param_slots gives for its shape
    fresh_lr: float  # a host-side group's rate in tx.init (schedule position 0)


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


def _moments(g, p, s, hp, b1):
    """Adam's first and second moments after one step, torch's way (what Adam, NAdam and RAdam
    share): L2 weight decay joins the gradient first unless it is decoupled. Returns (g, m, v),
    g with that decay added."""
    wd, b2 = hp["weight_decay"], hp["beta2"]
    if wd and not hp["decoupled_weight_decay"]:
        g = g + wd * p
    m = _lerp(s["exp_avg"], g, 1.0 - b1)
    v = s["exp_avg_sq"] * b2 + (1.0 - b2) * g * g
    return g, m, v


def _adam(g, p, s, step, hp, lr, b1):
    step = step + 1
    wd, b2 = hp["weight_decay"], hp["beta2"]
    g, m, v = _moments(g, p, s, hp, b1)
    new = {"exp_avg": m, "exp_avg_sq": v}
    # 1 - b**t with b rounded to float32 loses ~1e-5 for b2 = 0.999; expm1 keeps torch's digits.
    log_b1 = math.log(b1) if isinstance(b1, float) else jnp.log(b1)
    c1, c2 = -jnp.expm1(step * log_b1), -jnp.expm1(step * math.log(b2))
    if hp["amsgrad"]:
        v = new["max_exp_avg_sq"] = jnp.maximum(s["max_exp_avg_sq"], v)
    denom = jnp.sqrt(v) / jnp.sqrt(c2) + hp["eps"]
    u = -(lr / c1) * m / denom
    if wd and hp["decoupled_weight_decay"]:
        u = _decoupled_decay(u, p, lr, hp)
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


def _decoupled_decay(u, p, lr, hp):
    # Torch scales p by (1 - lr * wd) first; p * c - p is exact (Sterbenz), so p + u rounds
    # like torch's two in-place ops up to one final rounding.
    return (p * (1.0 - lr * hp["weight_decay"]) - p) + u


def _nadam(g, p, s, step, hp, lr, b1):
    step = step + 1
    wd, b2, psi = hp["weight_decay"], hp["beta2"], hp["momentum_decay"]
    g, m, v = _moments(g, p, s, hp, b1)
    # mu_t = beta1 (1 - 0.5 * 0.96 ** (t psi)), the momentum cache of Dozat's Nesterov Adam.
    mu = b1 * (1.0 - 0.5 * jnp.exp(step * (psi * math.log(0.96))))
    mu_next = b1 * (1.0 - 0.5 * jnp.exp((step + 1.0) * (psi * math.log(0.96))))
    mu_product = s["mu_product"] * mu  # torch keeps it as a float32 tensor
    c2 = -jnp.expm1(step * math.log(b2))
    denom = jnp.sqrt(v / c2) + hp["eps"]
    mu_product_next = mu_product * mu_next
    u = -(lr * (1.0 - mu) / (1.0 - mu_product)) * g / denom
    u = u - (lr * mu_next / (1.0 - mu_product_next)) * m / denom
    if wd and hp["decoupled_weight_decay"]:
        u = _decoupled_decay(u, p, lr, hp)
    return u, {"exp_avg": m, "exp_avg_sq": v, "mu_product": mu_product}, step


# Bernoulli-number coefficients c_k of z / (e^z - 1) = 1 - z/2 + sum_k c_k z^(2k), k = 1..5.
_BERNOULLI = (1 / 12, -1 / 720, 1 / 30240, -1 / 1209600, 1 / 47900160)


def _radam_rho(step, b2: float):
    """RAdam's ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``, accurate in float32.

    Torch computes it in Python doubles. In float32 the two terms (both ~2 / (1 - b2), 2000
    for b2 = 0.999) cancel down to ~t, losing 4e-4 absolute where the rectifier starts (t ~ 6).
    With u = -log(b2) and f(z) = z / (e^z - 1): rho_t + 1 = (2/u) (f(-u) - f(t u)), whose
    series in u and t u has no cancellation; for t u >= 1 the direct form loses nothing.
    """
    u = -math.log(b2)
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    z = step * u
    direct = rho_inf - 2.0 * step / jnp.expm1(z)
    zs = jnp.minimum(z, 1.0)
    series = step  # rho_t = t + (2/u) sum_k c_k (u^2k - (t u)^2k)
    for k, c in enumerate(_BERNOULLI, start=1):
        series = series + 2.0 * c * (u ** (2 * k - 1) - zs ** (2 * k) / u)
    return jnp.where(z < 1.0, series, direct), rho_inf


def _radam(g, p, s, step, hp, lr, b1):
    step = step + 1
    wd, b2 = hp["weight_decay"], hp["beta2"]
    g, m, v = _moments(g, p, s, hp, b1)
    log_b1 = math.log(b1) if isinstance(b1, float) else jnp.log(b1)
    c1, c2 = -jnp.expm1(step * log_b1), -jnp.expm1(step * math.log(b2))
    rho, rho_inf = _radam_rho(step, b2)
    # The rectifier; NaN where rho <= 4, but then the plain momentum step is taken.
    rect = jnp.sqrt((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))
    adaptive = jnp.sqrt(c2) / (jnp.sqrt(v) + hp["eps"])
    u = -(m / c1) * lr
    u = jnp.where(rho > 5.0, u * adaptive * rect, u)
    if wd and hp["decoupled_weight_decay"]:
        u = _decoupled_decay(u, p, lr, hp)
    return u, {"exp_avg": m, "exp_avg_sq": v}, step


def _adamax(g, p, s, step, hp, lr, b1):
    step = step + 1
    if hp["weight_decay"]:
        g = g + hp["weight_decay"] * p
    m = _lerp(s["exp_avg"], g, 1.0 - b1)
    # The infinity norm: u_t = max(b2 u_{t-1}, |g| + eps), eps inside the max as torch has it.
    inf = jnp.maximum(s["exp_inf"] * hp["beta2"], jnp.abs(g) + hp["eps"])
    log_b1 = math.log(b1) if isinstance(b1, float) else jnp.log(b1)
    clr = lr / -jnp.expm1(step * log_b1)
    return -clr * m / inf, {"exp_avg": m, "exp_inf": inf}, step


def _rms(x):
    return jnp.sqrt(jnp.sum(x * x) / max(x.size, 1))


def _adafactor(g, p, s, step, hp, lr, mom):
    del mom
    step = step + 1
    eps1, eps2 = hp["eps1"], hp["eps2"]
    w = jnp.power(step, hp["beta2_decay"])  # 1 - beta2_t = t ** beta2_decay
    # Relative step: rho_t = min(lr, 1/sqrt(t)), scaled by the parameter's RMS (before decay).
    alpha = jnp.maximum(eps2, _rms(p)) * jnp.minimum(lr, 1.0 / jnp.sqrt(step))
    if g.ndim > 1:
        row = _lerp(s["row_var"], jnp.sum(g * g, axis=-1, keepdims=True) / g.shape[-1], w)
        col = _lerp(s["col_var"], jnp.sum(g * g, axis=-2, keepdims=True) / g.shape[-2], w)
        row_mean = jnp.maximum(jnp.mean(row, axis=-2, keepdims=True), eps1)
        var = row * col / row_mean  # torch's row_var @ col_var: an outer product
        new = {"row_var": row, "col_var": col}
    else:
        var = new_var = _lerp(s["variance"], g * g, w)
        new = {"variance": new_var}
    update = jax.lax.rsqrt(jnp.maximum(var, eps1 * eps1)) * g
    denom = jnp.maximum(1.0, _rms(update) / hp["d"])  # clip the update's RMS at d
    u = -(alpha / denom) * update
    if hp["weight_decay"]:
        u = _decoupled_decay(u, p, lr, hp)
    return u, new, step


# name -> (update rule, hyperparameter keys read from the torch param group)
_RULES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "SGD": (_sgd, ("momentum", "dampening", "nesterov", "weight_decay")),
    "Adam": (_adam, ("betas", "eps", "weight_decay", "amsgrad")),
    "Adagrad": (_adagrad, ("lr_decay", "eps", "weight_decay", "initial_accumulator_value")),
    "RMSprop": (_rmsprop, ("alpha", "eps", "weight_decay", "momentum", "centered")),
    "NAdam": (_nadam, ("betas", "eps", "weight_decay", "momentum_decay")),
    "RAdam": (_radam, ("betas", "eps", "weight_decay")),
    "Adamax": (_adamax, ("betas", "eps", "weight_decay")),
    "Adafactor": (_adafactor, ("beta2_decay", "eps", "d", "weight_decay")),
}
_RULES["AdamW"] = _RULES["Adam"]


def _scalar(x):
    return x.item() if hasattr(x, "item") else x


def _hyper(kind: str, group: dict) -> dict[str, Any]:
    import torch

    hp = {k: _scalar(group[k]) for k in _RULES[kind][1]}
    hp["maximize"] = bool(group.get("maximize", False))
    if "betas" in hp:
        b1, b2 = (float(_scalar(b)) for b in hp.pop("betas"))
        hp.update(beta1=b1, beta2=b2)
    if kind in ("Adam", "AdamW", "NAdam", "RAdam"):
        hp["decoupled_weight_decay"] = bool(group.get("decoupled_weight_decay", kind == "AdamW"))
    if kind == "Adafactor":
        eps1, eps2 = hp.pop("eps")
        if eps1 is None:
            # torch takes the machine epsilon of the group's first stepped parameter's dtype.
            first = next((p for p in group["params"] if p.requires_grad), None)
            eps1 = torch.finfo(first.dtype if first is not None else torch.float32).eps
        hp.update(eps1=float(_scalar(eps1)), eps2=float(_scalar(eps2)))
    return {k: v if isinstance(v, bool) else float(v) for k, v in hp.items()}


def _momentum_key(kind: str) -> str | None:
    table = {"SGD": "momentum", "RMSprop": "momentum", "Adagrad": None, "Adafactor": None}
    return table.get(kind, "beta1")


def _slots(kind: str, hp: dict, cycled: bool) -> tuple[str, ...]:
    if kind == "SGD":
        return ("momentum_buffer",) if hp["momentum"] != 0 or cycled else ()
    if kind == "Adagrad":
        return ("sum",)
    if kind == "RMSprop":
        out = ("square_avg",)
        out += ("momentum_buffer",) if hp["momentum"] > 0 or cycled else ()
        return out + (("grad_avg",) if hp["centered"] else ())
    if kind == "NAdam":
        return ("exp_avg", "exp_avg_sq", "mu_product")
    if kind == "RAdam":
        return ("exp_avg", "exp_avg_sq")
    if kind == "Adamax":
        return ("exp_avg", "exp_inf")
    if kind == "Adafactor":
        return ("row_var", "col_var", "variance")
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ())


def _param_slots(slots: tuple[str, ...], shape) -> tuple[str, ...]:
    """The slots one parameter holds: Adafactor factors the second moment of >= 2-D ones."""
    if "variance" in slots:
        factored = len(shape) > 1
        return tuple(s for s in slots if (s == "variance") != factored)
    return slots


def _slot_shape(slot: str, shape) -> tuple[int, ...]:
    shape = tuple(shape)
    if slot == "mu_product":
        return ()
    if slot == "row_var":  # mean over the last dimension
        return shape[:-1] + (1,)
    if slot == "col_var":  # mean over the second-last dimension
        return shape[:-2] + (1,) + shape[-1:]
    return shape


def _fresh(slot: str, hp: dict, shape, dtype) -> jax.Array:
    if slot == "mu_product":  # a float32 scalar in torch, whatever the parameter's dtype
        return jnp.ones((), jnp.float32)
    value = hp["initial_accumulator_value"] if slot == "sum" else 0.0
    return jnp.full(_slot_shape(slot, shape), value, dtype)


def _transformation(kind: str, groups: list[_Group]) -> optax.GradientTransformation:
    rule = _RULES[kind][0]
    mkey = _momentum_key(kind)
    managed = {n for grp in groups for n in grp.names}

    def lrs(count, host: Callable[[int], jax.Array]):
        return tuple(
            host(gi) if grp.schedule.on_host else grp.schedule.lr(count)
            for gi, grp in enumerate(groups)
        )

    def init(params: Mapping[str, jax.Array]) -> TorchOptimState:
        slots: dict[str, dict[str, jax.Array]] = {}
        for grp in groups:
            for n in grp.names:
                arr = params[n]
                for slot in _param_slots(grp.slots, arr.shape):
                    slots.setdefault(slot, {})[n] = _fresh(slot, grp.hp, arr.shape, arr.dtype)
        count = jnp.zeros([], jnp.int32)
        step = {n: jnp.zeros([], jnp.float32) for n in managed}
        lr = lrs(count, lambda gi: _rate(groups[gi].fresh_lr))
        return TorchOptimState(count, lr, step, slots)

    def update(updates, state: TorchOptimState, params=None):
        missing = sorted(managed - set(updates))
        if missing:
            raise ValueError(f"convert_optimizer's update: no gradient for {missing}.")
        needs_params = kind == "Adafactor" or any(grp.hp["weight_decay"] for grp in groups)
        if needs_params and params is None:
            raise ValueError(
                f"{kind} needs the params (weight decay, or Adafactor's relative step): "
                "tx.update(grads, state, params)."
            )
        # Names the torch optimizer didn't hold are not updated, as in torch.
        out = {n: jnp.zeros_like(g) for n, g in updates.items() if n not in managed}
        step = dict(state.step)
        slots = {slot: dict(per) for slot, per in state.slots.items()}
        for gi, grp in enumerate(groups):
            # A host-side rate was written by HostRates.before_step; a traced one is computed.
            lr = state.lr[gi] if grp.schedule.on_host else grp.schedule.lr(state.count)
            mom = grp.hp.get(mkey) if mkey else None
            if grp.schedule.momentum is not None:
                mom = grp.schedule.momentum(state.count)
            for n in grp.names:
                g = updates[n]
                dt = jnp.promote_types(g.dtype, jnp.float32)
                g = -g.astype(dt) if grp.hp["maximize"] else g.astype(dt)
                p = None if params is None else params[n].astype(dt)
                m = mom if mom is None or isinstance(mom, float) else mom.astype(dt)
                s = {slot: slots[slot][n] for slot in _param_slots(grp.slots, g.shape)}
                u, s, step[n] = rule(g, p, s, step[n], grp.hp, lr.astype(dt), m)
                out[n] = u.astype(updates[n].dtype)
                for slot, value in s.items():  # state keeps its dtype (torch's: the param's)
                    slots[slot][n] = value.astype(slots[slot][n].dtype)
        count = optax.safe_int32_increment(state.count)

        def used_up(gi):  # a host-side rate: NaN until before_step writes the next one
            return jnp.full_like(state.lr[gi], jnp.nan)

        return out, TorchOptimState(count, lrs(count, used_up), step, slots)

    return optax.GradientTransformation(init, update)


def _rate(value: float) -> jax.Array:
    """A host-side rate as the traced schedules give theirs (float32, float64 under x64)."""
    return jnp.asarray(value, jax.dtypes.canonicalize_dtype(jnp.float64))


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

    if sched.on_host and sched.host_lr is None:
        return  # ReduceLROnPlateau: group["lr"] is the rate, whatever it is
    check("lr", float(_scalar(group["lr"])), lambda t: sched.rate_at(int(t)))
    if sched.momentum is not None:
        mkey = _momentum_key(kind)
        check(mkey, hp[mkey], sched.momentum)


def _param_state(name: str, p, st: dict, hp: dict, slots: tuple[str, ...]):
    """(step, {slot: array}) of one parameter from its torch ``optimizer.state[p]``."""
    has_buf = st.get("momentum_buffer") is not None
    step = jnp.asarray(float(_scalar(st.get("step", 1.0 if has_buf else 0.0))), jnp.float32)
    out = {}
    for slot in _param_slots(slots, tuple(p.shape)):
        value = st.get(slot)
        if value is None:  # not stepped yet (or SGD's buffer before its first step)
            dtype = jnp.dtype(str(p.dtype).removeprefix("torch."))
            out[slot] = _fresh(slot, hp, tuple(p.shape), dtype)
            continue
        out[slot] = _to_jax(value)
        want = _slot_shape(slot, p.shape)
        if out[slot].shape != want:
            raise ValueError(f"{name}: state[{slot!r}] has shape {out[slot].shape}, not {want}.")
    return step, out


def _unsupported_message(optimizer=None, scheduler=None) -> str:
    """The one error message for an optimizer or LR scheduler this module can't convert: it
    lists every supported class of both, whichever of the two was refused."""
    what = optimizer if optimizer is not None else scheduler
    kind = "optimizer" if optimizer is not None else "LR scheduler"
    return (
        f"Can't convert the {kind} {type(what).__module__}.{type(what).__qualname__} to optax. "
        f"Supported optimizers (torch.optim, exact classes): {', '.join(SUPPORTED_OPTIMIZERS)}. "
        f"Supported schedulers (torch.optim.lr_scheduler, stepped once per optimizer step; "
        f"ReduceLROnPlateau with the step's loss): {', '.join(SUPPORTED_SCHEDULERS)}."
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
            per optimizer step after it; a class in ``SUPPORTED_SCHEDULERS``. If a param
            group's rate can't be traced (a LambdaLR lambda with Python ``math`` or branches,
            ReduceLROnPlateau), the update reads it from ``opt_state.lr``: drive the loop with
            :func:`host_rates` (``before_step`` before each update), or every update after the
            first gives NaN.

    Returns:
        ``(tx, opt_state)``: ``tx`` works on flat ``{name: array}`` dicts of grads and params
        (``tx.update(grads, opt_state, params)``, then ``optax.apply_updates``); ``opt_state``
        is a :class:`TorchOptimState` continuing from the optimizer's and scheduler's position.
        ``tx.init(params)`` gives the state of a fresh optimizer at schedule position 0.

    Raises:
        ValueError: an unsupported optimizer or scheduler (listing the supported ones), a
            parameter missing from ``names``, complex parameters, or a ``group["lr"]`` that
            disagrees with the scheduler.
    """
    import torch

    kind = type(optimizer).__name__
    if kind not in SUPPORTED_OPTIMIZERS or type(optimizer) is not getattr(torch.optim, kind, None):
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
        fresh = float(_scalar(group["lr"]))
        if sched.host_lr is not None:
            fresh = sched.host_lr(0)
        groups.append(_Group(tuple(group_names), hp, sched, group_slots, fresh))

    tx = _transformation(kind, groups)
    count = jnp.asarray(epoch, jnp.int32)
    lr = tuple(
        _rate(float(_scalar(group["lr"]))) if grp.schedule.on_host else grp.schedule.lr(count)
        for group, grp in zip(optimizer.param_groups, groups, strict=True)
    )
    return tx, TorchOptimState(count, lr, step, slots)


class HostRates:
    """The learning rates of the param groups a jitted step can't compute, stepped on the host.

    Built by :func:`host_rates`, at the scheduler's position when converted. Torch's order is
    ``optimizer.step()`` (which uses ``group["lr"]``) then ``scheduler.step()``; here that is
    ``before_step`` (write the rate the step about to run uses), the update, then
    ``after_step`` (move the schedule on, as ``scheduler.step()`` / ``scheduler.step(loss)``).
    Call both once per optimizer step (once per accumulated step, not per micro-batch).

    Attributes:
        needs_loss: True for ReduceLROnPlateau: ``after_step`` needs the step's loss.
        epoch: the scheduler's ``last_epoch``; the step about to run uses the rate at it.
    """

    def __init__(self, schedules: list[GroupSchedule], epoch: int, plateau: Plateau | None):
        self._schedules = schedules
        self._plateau = plateau
        self.epoch = epoch
        self.needs_loss = plateau is not None

    def rates(self) -> tuple[float | None, ...]:
        """Per param group, the host-side rate of the next step (None: traced in the step)."""
        out = []
        for i, sched in enumerate(self._schedules):
            if not sched.on_host:
                out.append(None)
            elif sched.host_lr is None:
                out.append(self._plateau.lrs[i])
            else:
                out.append(sched.host_lr(self.epoch))
        return tuple(out)

    def before_step(self, opt_state):
        """``opt_state`` with the rates of the step about to run written in.

        Args:
            opt_state: the state ``convert_optimizer`` returned (as updated since), or a
                structure holding it (``optax.chain``'s tuple, ``optax.MultiSteps``' state):
                every :class:`TorchOptimState` inside is rewritten.
        """
        rates = self.rates()
        found = []

        def write(node):
            if not isinstance(node, TorchOptimState):
                return node
            if len(node.lr) != len(rates):
                raise ValueError(
                    f"HostRates.before_step: the optimizer state has {len(node.lr)} param "
                    f"groups, the scheduler {len(rates)}; pass the state convert_optimizer "
                    "returned for the same optimizer."
                )
            found.append(node)
            lr = tuple(
                old if r is None else jnp.asarray(r, old.dtype)
                for old, r in zip(node.lr, rates, strict=True)
            )
            return node._replace(lr=lr)

        out = jax.tree.map(write, opt_state, is_leaf=lambda x: isinstance(x, TorchOptimState))
        if not found:
            raise ValueError(
                "HostRates.before_step: no TorchOptimState in opt_state; pass the state "
                "convert_optimizer returned (or the optax state that wraps it)."
            )
        return out

    def after_step(self, loss: float | None = None) -> None:
        """Move the schedule on by one optimizer step (torch's ``scheduler.step()``).

        Args:
            loss: the loss of the step just run (a float or a scalar array), which
                ReduceLROnPlateau compares with its best (``scheduler.step(loss)``); ignored,
                and may be None, when ``needs_loss`` is False.
        """
        if self._plateau is not None:
            if loss is None:
                raise ValueError(
                    "ReduceLROnPlateau steps on the loss: call after_step(loss) with the loss "
                    "of the step just run (as torch's scheduler.step(loss))."
                )
            self._plateau.step(float(loss))
        self.epoch += 1


def host_rates(optimizer, scheduler) -> HostRates | None:
    """The host-side half of a converted scheduler, or None when every rate traces.

    A ``LambdaLR`` lambda JAX can't trace (Python ``math``, ``min``, ``if`` on the epoch: the
    transformers ``get_*_schedule_with_warmup`` lambdas, nanoGPT's ``get_lr``), a
    ``SequentialLR`` holding one, and ``ReduceLROnPlateau`` are evaluated here in Python, per
    step, exactly as torch evaluates them; the rate reaches the jitted update through
    ``opt_state.lr`` (see :class:`HostRates`).

    Args:
        optimizer: the torch optimizer passed to :func:`convert_optimizer`.
        scheduler: the scheduler passed to it (None: no scheduler, returns None).

    Raises:
        ValueError: as :func:`convert_optimizer` for an unsupported scheduler.
    """
    if scheduler is None:
        return None
    if not is_supported(scheduler):
        raise ValueError(_unsupported_message(scheduler=scheduler))
    scheds = group_schedules(scheduler, optimizer)
    if not any(s.on_host for s in scheds):
        return None
    plateau = None
    if type(scheduler).__name__ == "ReduceLROnPlateau":
        plateau = Plateau(scheduler, optimizer)
    return HostRates(scheds, int(scheduler.last_epoch), plateau)

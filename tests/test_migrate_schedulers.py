"""LR schedules a jitted step can't trace run on the host (`host_rates`) and continue like torch.

The schedulers of the recipes people use: transformers' `get_*_schedule_with_warmup` (a
`functools.partial` with `math` and branches inside `LambdaLR`), nanoGPT's `get_lr` (Python
`math.cos` and `if`), and `ReduceLROnPlateau` (driven by the losses). Each case: torch takes PRE
steps, the optimizer and scheduler are converted, then torch and the jitted optax update take
POST more steps with the same gradients (and losses); the rate of every step (torch's
`group["lr"]` before `optimizer.step()`) and the parameters at the end must agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.requires("torch", "jax", "hf")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from torch.optim import lr_scheduler as lrs  # noqa: E402
from transformers import optimization as hf  # noqa: E402

from mlperf_tutor.migrate.optim import (  # noqa: E402
    SUPPORTED_OPTIMIZERS,
    SUPPORTED_SCHEDULERS,
    HostRates,
    convert_optimizer,
    host_rates,
)

SHAPES = {"fc.weight": (4, 3), "fc.bias": (3,), "norm.weight": (5,)}


def _adamw(ps):
    """nanoGPT's and transformers' recipe: AdamW, no decay on biases and norms."""
    groups = [
        {"params": [ps["fc.weight"]]},
        {"params": [ps["fc.bias"], ps["norm.weight"]], "weight_decay": 0.0, "lr": 3e-3},
    ]
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)


def _sgd(ps):
    return torch.optim.SGD(ps.values(), lr=0.1, momentum=0.9)


def nanogpt_get_lr(it, learning_rate=1e-2, warmup_iters=3, lr_decay_iters=10, min_lr=1e-3):
    """nanoGPT's train.py schedule: linear warmup, cosine decay, then a floor."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def _warmup_then_cosine(o):
    warmup = lrs.LambdaLR(o, lambda e: min(1.0, (e + 1) / 3))  # min(): not traceable
    return lrs.SequentialLR(o, [warmup, lrs.CosineAnnealingLR(o, T_max=8)], milestones=[3])


# name -> (optimizer, scheduler); every one has at least one param group computed on the host.
HOST_SCHEDULES = {
    "hf_linear_warmup": (
        _adamw,
        lambda o: hf.get_linear_schedule_with_warmup(o, num_warmup_steps=3, num_training_steps=12),
    ),
    "hf_cosine_warmup": (
        _adamw,
        lambda o: hf.get_cosine_schedule_with_warmup(o, num_warmup_steps=2, num_training_steps=12),
    ),
    "hf_constant_warmup": (
        _sgd,
        lambda o: hf.get_constant_schedule_with_warmup(o, num_warmup_steps=5),
    ),
    # nanoGPT sets group["lr"] = get_lr(it) by hand; as a LambdaLR it is get_lr(it) / base.
    "nanogpt_get_lr": (_sgd, lambda o: lrs.LambdaLR(o, lambda it: nanogpt_get_lr(it) / 0.1)),
    "lambda_per_group_traced_and_host": (
        _adamw,
        lambda o: lrs.LambdaLR(o, [lambda e: 0.9**e, lambda e: 1.0 if e < 4 else 0.5]),
    ),
    "sequential_host_lambda_then_cosine": (_adamw, _warmup_then_cosine),
}


def _torch_step(opt, sched, params, grads, loss=None):
    for name, p in params.items():
        p.grad = torch.from_numpy(grads[name].copy())
    opt.step()
    if loss is None:
        sched.step()
    else:
        sched.step(loss)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _run_both(make_opt, make_sched, pre, post, losses=None, wrap=None):
    """Torch `pre` steps, convert, then both `post` steps; the rates checked at every step.

    `losses` (length pre + post) drive ReduceLROnPlateau; `wrap(tx, state)` puts the converted
    transformation and state inside other optax ones (before_step must find the state inside).
    Returns the torch rates of the `post` steps and the scheduler at conversion's attributes.
    """
    rng = np.random.default_rng(0)
    params = {
        n: torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(np.float32)))
        for n, s in SHAPES.items()
    }
    grads = [
        {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
        for _ in range(pre + post)
    ]
    loss_at = (lambda k: losses[k]) if losses is not None else (lambda k: None)
    opt = make_opt(params)
    sched = make_sched(opt)
    for k in range(pre):
        _torch_step(opt, sched, params, grads[k], loss_at(k))
    at_conversion = dict(vars(sched))

    tx, state = convert_optimizer(opt, {id(p): n for n, p in params.items()}, sched)
    rates = host_rates(opt, sched)
    assert isinstance(rates, HostRates)
    assert rates.needs_loss == (losses is not None)
    if wrap is not None:
        tx, state = wrap(tx, state)
    jparams = {n: jnp.array(p.detach().numpy(), copy=True) for n, p in params.items()}
    update = jax.jit(tx.update)
    seen = []
    for k in range(pre, pre + post):
        torch_lrs = [g["lr"] for g in opt.param_groups]
        seen.append(torch_lrs)
        state = rates.before_step(state)
        inner = state if wrap is None else state[-1]
        np.testing.assert_allclose(np.asarray(inner.lr), torch_lrs, rtol=1e-6, atol=0)
        _torch_step(opt, sched, params, grads[k], loss_at(k))
        before = jax.tree.map(jax.typeof, state)
        updates, state = update({n: jnp.asarray(g) for n, g in grads[k].items()}, state, jparams)
        assert jax.tree.map(jax.typeof, state) == before  # same types: jit compiles once
        jparams = optax.apply_updates(jparams, updates)
        rates.after_step(loss_at(k))
    for n, p in params.items():
        assert _rel(jparams[n], p.detach().numpy()) <= 1e-6, n
    return seen, at_conversion


@pytest.mark.parametrize("case", sorted(HOST_SCHEDULES))
def test_host_schedule_continues_after_conversion(case):
    make_opt, make_sched = HOST_SCHEDULES[case]
    seen, _ = _run_both(make_opt, make_sched, pre=2, post=12)
    assert len({tuple(r) for r in seen}) > 2, "the schedule must move within the run"


@pytest.mark.parametrize("case", ["hf_cosine_warmup", "nanogpt_get_lr"])
def test_host_schedule_converted_fresh(case):
    make_opt, make_sched = HOST_SCHEDULES[case]
    _run_both(make_opt, make_sched, pre=0, post=14)


def test_host_schedule_inside_optax_chain():
    """before_step finds the converted state inside a wrapping optax state (chain's tuple)."""
    make_opt, make_sched = HOST_SCHEDULES["hf_linear_warmup"]

    def in_chain(tx, state):
        return optax.chain(optax.scale(1.0), tx), (optax.EmptyState(), state)

    _run_both(make_opt, make_sched, pre=2, post=6, wrap=in_chain)


# Improvement, then plateaus long enough for reductions, cooldowns, the min_lr floor.
LOSSES = [5.0, 4.0, 3.0, 3.1, 3.2, 2.9995, 3.3, 3.0, 2.0, 2.5, 2.6, 2.7, 2.1, 2.8, 2.9, 3.0]
# name -> (torch steps before the conversion, chosen to convert mid-plateau, scheduler)
PLATEAUS = {
    "min_rel": (5, lambda o: lrs.ReduceLROnPlateau(o, factor=0.5, patience=2, threshold=1e-3)),
    "min_abs_cooldown_min_lr": (
        5,
        lambda o: lrs.ReduceLROnPlateau(
            o, factor=0.3, patience=1, threshold=0.05, threshold_mode="abs", cooldown=2, min_lr=1e-3
        ),
    ),
    "max_rel_per_group_min_lr": (
        4,
        lambda o: lrs.ReduceLROnPlateau(o, mode="max", factor=0.5, patience=1, min_lr=[1e-3, 2e-3]),
    ),
}


@pytest.mark.parametrize("case", sorted(PLATEAUS))
def test_reduce_on_plateau_follows_the_losses(case):
    pre, make_sched = PLATEAUS[case]
    losses = LOSSES if not case.startswith("max") else [-x for x in LOSSES]
    post = len(losses) - pre
    seen, at_conversion = _run_both(_adamw, make_sched, pre=pre, post=post, losses=losses)
    # Converted mid-plateau: the counters carried over matter.
    assert at_conversion["num_bad_epochs"] > 0 or at_conversion["cooldown_counter"] > 0
    assert seen[0] != seen[-1], "the losses must trigger a reduction after the conversion"


def test_update_without_before_step_gives_nan():
    """A host-side rate is used once: a loop that forgets before_step can't run on a stale rate."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = lrs.LambdaLR(opt, lambda e: math.cos(e / 10))
    tx, state = convert_optimizer(opt, {id(p): "p"}, sched)
    params, grads = {"p": jnp.ones(2)}, {"p": jnp.ones(2)}
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["p"], -0.1)  # the rate at conversion: 0.1 * cos(0)
    updates, state = tx.update(grads, state, params)
    assert np.isnan(np.asarray(updates["p"])).all()


def test_traced_schedules_need_no_host_rates():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    assert host_rates(opt, None) is None
    assert host_rates(opt, lrs.LambdaLR(opt, lambda e: 0.9**e)) is None
    assert host_rates(opt, hf.get_constant_schedule(opt)) is None


def test_plateau_after_step_needs_the_loss():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    rates = host_rates(opt, lrs.ReduceLROnPlateau(opt))
    with pytest.raises(ValueError, match="after_step\\(loss\\)"):
        rates.after_step()


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1),
        lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3),
    ],
)
def test_unsupported_scheduler_in_host_rates_lists_supported(make_sched):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sched = make_sched(opt)
    with pytest.raises(ValueError, match=type(sched).__name__) as err:
        host_rates(opt, sched)
    for name in SUPPORTED_OPTIMIZERS + SUPPORTED_SCHEDULERS:
        assert name in str(err.value)

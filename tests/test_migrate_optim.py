"""torch.optim optimizers and LR schedulers converted to optax mid-run continue like PyTorch.

Each case: torch takes PRE steps on random parameters with random gradients, the optimizer (and
scheduler) is converted, then torch and the jitted optax update both take POST more steps with
the same gradients. Parameters must agree to float32 round-off (relative 1e-6: the updates are
elementwise) and the learning rates to 1e-6 relative (torch's recursive schedulers differ from the
closed forms by round-off only).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.requires("torch", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from torch.optim import lr_scheduler as lrs  # noqa: E402

from mlperf_tutor.migrate.optim import (  # noqa: E402
    SUPPORTED_OPTIMIZERS,
    SUPPORTED_SCHEDULERS,
    _radam_rho,
    convert_optimizer,
)

PRE, POST = 3, 7
# A 3-D weight too: Adafactor factors the second moment of every >= 2-D parameter.
SHAPES = {"fc.weight": (4, 3), "fc.bias": (3,), "norm.weight": (5,), "conv.weight": (2, 3, 4)}


def _groups(params, **no_decay):
    """Two param groups: weights with the optimizer's defaults, biases/norms with `no_decay`."""
    decay = [params["fc.weight"], params["conv.weight"]]
    rest = [params["fc.bias"], params["norm.weight"]]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0, **no_decay}]


optim = torch.optim
OPTIMIZERS = {
    "sgd": lambda ps: optim.SGD(ps.values(), lr=0.1),
    "sgd_momentum_dampening": lambda ps: optim.SGD(
        ps.values(), lr=0.1, momentum=0.9, dampening=0.3
    ),
    "sgd_nesterov_wd": lambda ps: optim.SGD(
        ps.values(), lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1
    ),
    "sgd_two_groups": lambda ps: optim.SGD(
        _groups(ps, lr=0.3), lr=0.1, momentum=0.9, weight_decay=0.05
    ),
    "sgd_maximize": lambda ps: optim.SGD(ps.values(), lr=0.1, momentum=0.5, maximize=True),
    "adam": lambda ps: optim.Adam(ps.values(), lr=0.01),
    "adam_l2_eps": lambda ps: optim.Adam(
        ps.values(), lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1
    ),
    "adam_amsgrad": lambda ps: optim.Adam(ps.values(), lr=0.01, amsgrad=True),
    "adam_two_groups": lambda ps: optim.Adam(
        _groups(ps, lr=0.05, betas=(0.5, 0.9)), lr=0.01, weight_decay=0.1
    ),
    "adamw": lambda ps: optim.AdamW(ps.values(), lr=0.01, weight_decay=0.5),
    "adamw_two_groups_amsgrad": lambda ps: optim.AdamW(
        _groups(ps, lr=0.03), lr=0.01, weight_decay=0.2, amsgrad=True
    ),
    "adagrad": lambda ps: optim.Adagrad(ps.values(), lr=0.1),
    "adagrad_all_options": lambda ps: optim.Adagrad(
        ps.values(),
        lr=0.1,
        lr_decay=0.05,
        weight_decay=0.1,
        initial_accumulator_value=0.3,
        eps=1e-3,
    ),
    "adagrad_two_groups": lambda ps: optim.Adagrad(
        _groups(ps, lr=0.5, lr_decay=0.1), lr=0.1, weight_decay=0.1
    ),
    "rmsprop": lambda ps: optim.RMSprop(ps.values(), lr=0.01),
    "rmsprop_centered_momentum": lambda ps: optim.RMSprop(
        ps.values(), lr=0.01, alpha=0.9, centered=True, momentum=0.9, weight_decay=0.1
    ),
    "rmsprop_two_groups": lambda ps: optim.RMSprop(
        _groups(ps, lr=0.03, centered=True), lr=0.01, momentum=0.5, eps=1e-4
    ),
    "nadam": lambda ps: optim.NAdam(ps.values(), lr=0.01),
    "nadam_two_groups_l2": lambda ps: optim.NAdam(
        _groups(ps, lr=0.05, betas=(0.8, 0.9), momentum_decay=0.01), lr=0.01, weight_decay=0.1
    ),
    "nadam_decoupled_maximize": lambda ps: optim.NAdam(
        ps.values(), lr=0.02, eps=1e-4, weight_decay=0.1, decoupled_weight_decay=True, maximize=True
    ),
    # beta2 = 0.999: rho_t passes 5 at step 6, within the 10 steps; 0.9 and 0.99 rectify sooner.
    "radam": lambda ps: optim.RAdam(ps.values(), lr=0.01),
    "radam_two_groups_l2": lambda ps: optim.RAdam(
        _groups(ps, lr=0.05, betas=(0.5, 0.9)), lr=0.01, weight_decay=0.1
    ),
    "radam_decoupled": lambda ps: optim.RAdam(
        ps.values(), lr=0.01, betas=(0.9, 0.99), weight_decay=0.2, decoupled_weight_decay=True
    ),
    "adamax": lambda ps: optim.Adamax(ps.values(), lr=0.01),
    "adamax_two_groups_wd": lambda ps: optim.Adamax(
        _groups(ps, lr=0.05, betas=(0.5, 0.9), eps=1e-3), lr=0.01, weight_decay=0.1
    ),
    "adafactor": lambda ps: optim.Adafactor(ps.values()),
    # lr = 0.5 > 1/sqrt(t) from t = 5: the relative step switches rule within the run.
    "adafactor_two_groups_wd": lambda ps: optim.Adafactor(
        _groups(ps, lr=0.5, beta2_decay=-0.5, eps=(1e-3, 1e-2)), lr=0.05, weight_decay=0.1
    ),
    "adafactor_clipped_maximize": lambda ps: optim.Adafactor(
        ps.values(), lr=0.02, d=1.0, eps=(1e-30, 0.1), maximize=True
    ),
}


def _sgd(ps):
    return optim.SGD(ps.values(), lr=0.1, momentum=0.9)


def _sgd_groups(ps):
    return optim.SGD(_groups(ps, lr=0.3), lr=0.1, momentum=0.9, weight_decay=0.05)


def _adam_groups(ps):
    return optim.Adam(_groups(ps, lr=0.05), lr=0.01, weight_decay=0.1)


def _lambda_with_jnp_twin(opt):
    """Python math for torch, a jnp twin for the conversion (keeps the rate in the jitted step)."""
    sched = lrs.LambdaLR(opt, lambda e: min(1.0, (e + 1) / 4) * math.cos(e / 10))
    sched.jnp_twins = [lambda e: jnp.minimum(1.0, (e + 1) / 4) * jnp.cos(e / 10)]
    return sched


S = lrs
SCHEDULERS = {
    "step": (_sgd_groups, lambda o: S.StepLR(o, step_size=3, gamma=0.5)),
    "multistep_repeated": (_sgd, lambda o: S.MultiStepLR(o, milestones=[2, 5, 5, 8], gamma=0.5)),
    "exponential": (_adam_groups, lambda o: S.ExponentialLR(o, gamma=0.8)),
    "cosine": (_sgd_groups, lambda o: S.CosineAnnealingLR(o, T_max=6, eta_min=0.01)),
    "linear": (
        _adam_groups,
        lambda o: S.LinearLR(o, start_factor=0.1, end_factor=0.9, total_iters=6),
    ),
    "constant": (_sgd, lambda o: S.ConstantLR(o, factor=0.3, total_iters=4)),
    "polynomial": (_sgd_groups, lambda o: S.PolynomialLR(o, total_iters=8, power=2.0)),
    # Arithmetic and ** work on torch's int epoch and on JAX's tracer alike.
    "lambda": (_sgd, lambda o: S.LambdaLR(o, lambda e: 0.9**e * (e + 1) / 4)),
    "lambda_per_group": (
        _sgd_groups,
        lambda o: S.LambdaLR(o, [lambda e: 1.0 / (1 + e), lambda e: 0.5 ** (e // 2)]),
    ),
    "lambda_jnp_twin": (_sgd, _lambda_with_jnp_twin),
    "onecycle_sgd_momentum": (
        _sgd_groups,
        lambda o: S.OneCycleLR(o, max_lr=[1.0, 0.5], total_steps=12),
    ),
    "onecycle_adam_beta1_three_phase": (
        _adam_groups,
        lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=12, three_phase=True, pct_start=0.25),
    ),
    "onecycle_linear_no_momentum": (
        lambda ps: optim.RMSprop(ps.values(), lr=0.01, momentum=0.5),
        lambda o: S.OneCycleLR(
            o, max_lr=0.05, total_steps=10, anneal_strategy="linear", cycle_momentum=False
        ),
    ),
    "onecycle_rmsprop_momentum": (
        lambda ps: optim.RMSprop(ps.values(), lr=0.01, momentum=0.5, centered=True),
        lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=10),
    ),
    # OneCycleLR cycles beta1 of every optimizer with betas: a traced beta1 in NAdam's mu_t.
    "onecycle_nadam_beta1": (
        lambda ps: optim.NAdam(ps.values(), lr=0.01, weight_decay=0.1),
        lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=12),
    ),
    "onecycle_radam_beta1": (
        lambda ps: optim.RAdam(ps.values(), lr=0.01, betas=(0.9, 0.99)),
        lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=12),
    ),
    "cosine_adamax": (
        lambda ps: optim.Adamax(ps.values(), lr=0.05),
        lambda o: S.CosineAnnealingLR(o, T_max=6),
    ),
    # Adafactor's lr caps the relative step: a schedule moves it across 1/sqrt(t).
    "linear_adafactor": (
        lambda ps: optim.Adafactor(_groups(ps, lr=0.5), lr=0.2, weight_decay=0.1),
        lambda o: S.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=8),
    ),
    "sequential_warmup_cosine": (
        _adam_groups,
        lambda o: S.SequentialLR(
            o,
            [S.LinearLR(o, start_factor=0.2, total_iters=3), S.CosineAnnealingLR(o, T_max=5)],
            milestones=[3],
        ),
    ),
    "sequential_three": (
        _sgd_groups,
        lambda o: S.SequentialLR(
            o,
            [
                S.ConstantLR(o, factor=0.5, total_iters=2),
                S.ExponentialLR(o, gamma=0.7),
                S.LambdaLR(o, lambda e: 1.0 / (e + 1)),
            ],
            milestones=[2, 6],
        ),
    ),
}


def _torch_step(opt, sched, params, grads):
    for name, p in params.items():
        p.grad = torch.from_numpy(grads[name].copy())
    opt.step()
    if sched is not None:
        sched.step()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _continue_in_both(make_opt, make_sched=None, pre=PRE, post=POST, jit=True):
    """Step torch `pre` times, convert, step both `post` times; check lr, params and state."""
    rng = np.random.default_rng(0)
    params = {
        n: torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(np.float32)))
        for n, s in SHAPES.items()
    }
    grads = [
        {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
        for _ in range(pre + post)
    ]
    opt = make_opt(params)
    sched = make_sched(opt) if make_sched else None
    for k in range(pre):
        _torch_step(opt, sched, params, grads[k])

    python_lambdas = getattr(sched, "lr_lambdas", None)
    if hasattr(sched, "jnp_twins"):
        sched.lr_lambdas = sched.jnp_twins
    tx, state = convert_optimizer(opt, {id(p): n for n, p in params.items()}, sched)
    if python_lambdas is not None:
        sched.lr_lambdas = python_lambdas
    # Copies: torch goes on updating its parameters in place.
    jparams = {n: jnp.array(p.detach().numpy(), copy=True) for n, p in params.items()}
    update = jax.jit(tx.update) if jit else tx.update
    for k in range(pre, pre + post):
        torch_lrs = [g["lr"] for g in opt.param_groups]
        np.testing.assert_allclose(np.asarray(state.lr), torch_lrs, rtol=1e-6, atol=1e-12)
        _torch_step(opt, sched, params, grads[k])
        before = jax.tree.map(jax.typeof, state)
        updates, state = update({n: jnp.asarray(g) for n, g in grads[k].items()}, state, jparams)
        assert jax.tree.map(jax.typeof, state) == before  # same types: jit compiles once
        jparams = optax.apply_updates(jparams, updates)
    for n, p in params.items():
        assert _rel(jparams[n], p.detach().numpy()) <= 1e-6, n
    # The converted state keeps tracking torch's: moments, buffers, step counts.
    for p_name, p in params.items():
        for slot, value in opt.state[p].items():
            if slot == "step":
                assert float(state.step[p_name]) == float(value)
            elif value is not None:
                assert _rel(state.slots[slot][p_name], value.numpy()) <= 1e-5, (slot, p_name)
    return tx, state


@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_optimizer_continues_after_conversion(case):
    _continue_in_both(OPTIMIZERS[case])


FRESH = [
    "sgd_momentum_dampening",
    "adam_two_groups",
    "adagrad_all_options",
    "rmsprop_centered_momentum",
    "nadam_two_groups_l2",
    "radam",
    "adamax_two_groups_wd",
    "adafactor_two_groups_wd",
]


@pytest.mark.parametrize("case", FRESH)
def test_optimizer_converted_fresh(case):
    _continue_in_both(OPTIMIZERS[case], pre=0, post=PRE + POST)


@pytest.mark.parametrize("case", sorted(SCHEDULERS))
def test_scheduler_continues_after_conversion(case):
    make_opt, make_sched = SCHEDULERS[case]
    _continue_in_both(make_opt, make_sched)


@pytest.mark.parametrize("case", ["cosine", "onecycle_adam_beta1_three_phase", "sequential_three"])
def test_scheduler_converted_fresh(case):
    make_opt, make_sched = SCHEDULERS[case]
    _continue_in_both(make_opt, make_sched, pre=0, post=PRE + POST)


def test_sequential_past_milestone_unjitted():
    make_opt, make_sched = SCHEDULERS["sequential_three"]
    _continue_in_both(make_opt, make_sched, pre=7, post=3, jit=False)


def test_init_is_a_fresh_optimizer():
    """tx.init gives the state a new torch optimizer and scheduler would have."""
    tx, _ = _continue_in_both(*SCHEDULERS["step"], pre=2, post=1, jit=False)
    params = {n: jnp.ones(s) for n, s in SHAPES.items()}
    state = tx.init(params)
    assert int(state.count) == 0 and set(state.slots) == {"momentum_buffer"}
    np.testing.assert_allclose(np.asarray(state.lr), [0.1, 0.3], rtol=1e-6)
    assert all(float(s) == 0 for s in state.step.values())


def test_unsupported_optimizer_lists_supported():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="LBFGS") as err:
        convert_optimizer(optim.LBFGS([p]), {id(p): "p"})
    for name in SUPPORTED_OPTIMIZERS + SUPPORTED_SCHEDULERS:
        assert name in str(err.value)


def test_transformers_adafactor_is_refused():
    """transformers' Adafactor shares torch's class name but not its rule."""
    from transformers.optimization import Adafactor

    p = torch.nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="transformers.optimization.Adafactor") as err:
        convert_optimizer(Adafactor([p], lr=1e-3, relative_step=False), {id(p): "p"})
    for name in SUPPORTED_OPTIMIZERS + SUPPORTED_SCHEDULERS:
        assert name in str(err.value)


@pytest.mark.parametrize("b2", [0.5, 0.9, 0.99, 0.999, 0.9999])
def test_radam_rho_keeps_torch_double_precision(b2):
    """rho_t in float32 as torch's Python-double formula gives it, where the rectifier starts."""
    steps = [*range(1, 40), 100, 999, 1000, 5000, 100000]
    for t in steps:
        rho_inf = 2 / (1 - b2) - 1  # torch's radam.py, in doubles
        want = rho_inf - 2 * t * (b2**t) / (1 - b2**t)
        got = float(_radam_rho(jnp.float32(t), b2)[0])
        assert abs(got - want) <= 3e-7 * abs(want), (t, got, want)


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1),
        lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3),
        lambda o: lrs.ChainedScheduler([lrs.StepLR(o, 2), lrs.ExponentialLR(o, 0.9)]),
    ],
)
def test_unsupported_scheduler_lists_supported(make_sched):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    sched = make_sched(opt)
    with pytest.raises(ValueError, match=type(sched).__name__) as err:
        convert_optimizer(opt, {id(p): "p"}, sched)
    for name in SUPPORTED_OPTIMIZERS + SUPPORTED_SCHEDULERS:
        assert name in str(err.value)


def test_lr_changed_outside_scheduler_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = optim.SGD([p], lr=0.1)
    sched = lrs.StepLR(opt, step_size=2)
    opt.param_groups[0]["lr"] = 0.5
    with pytest.raises(ValueError, match="outside the scheduler"):
        convert_optimizer(opt, {id(p): "p"}, sched)


def test_parameter_missing_from_names_is_refused():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not in `names`"):
        convert_optimizer(optim.Adam([p, q]), {id(p): "p"})


def test_params_outside_optimizer_are_not_updated():
    p, frozen = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    frozen.requires_grad_(False)  # torch never steps it though it is in the param group
    tx, state = convert_optimizer(optim.SGD([p, frozen], lr=0.1), {id(p): "p"})
    grads = {"p": jnp.ones(2), "frozen": jnp.ones(3)}
    updates, _ = tx.update(grads, state, {"p": jnp.ones(2), "frozen": jnp.ones(3)})
    np.testing.assert_allclose(updates["p"], -0.1)
    np.testing.assert_array_equal(updates["frozen"], 0.0)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_nested_sequential_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = optim.SGD([p], lr=1.0)
    inner = lrs.SequentialLR(
        opt, [lrs.ConstantLR(opt, 0.5, 2), lrs.ExponentialLR(opt, 0.5)], milestones=[2]
    )
    outer = lrs.SequentialLR(opt, [inner, lrs.StepLR(opt, 2)], milestones=[5])
    with pytest.raises(ValueError, match="one SequentialLR"):
        convert_optimizer(opt, {id(p): "p"}, outer)

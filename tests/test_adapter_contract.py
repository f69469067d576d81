"""The adapter contract, checked the same way for every framework on the toy workload.

Framework-specific behaviour (layout rules per layer type, BatchNorm conventions, tracing) is
tested in test_{torch,jax,tf}_adapter.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mlperf_tutor import frameworks, workloads
from mlperf_tutor.core import CheckpointMismatch, OptimizerSpec, ScheduleSpec, errors
from mlperf_tutor.core.parity import STEP_RTOL

pytestmark = pytest.mark.requires("torch", "jax", "tf")

WL = workloads.get("toy")
CFG = WL.config("tiny")
BUFFERS = ("bn.running_mean", "bn.running_var")
OPTIMIZERS = {
    "adamw": OptimizerSpec("adamw", weight_decay=0.01, no_decay=(r"bias$",), clip_norm=1.0),
    "sgd_nesterov": OptimizerSpec("sgd", momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adagrad": OptimizerSpec("adagrad", initial_accumulator=0.1, eps=1e-8),
    "lamb": OptimizerSpec(
        "lamb", eps=1e-6, weight_decay=0.01, no_decay=("bias", r"^(bn|gn|ln)\."), clip_norm=1.0
    ),
}
SCHEDULE = ScheduleSpec(1e-2, warmup_steps=2, decay="cosine", total_steps=12, end_lr=1e-3)


def batch(step: int) -> dict:
    return WL.synthetic_batch(CFG, batch_size=4, seed=100 + step)


def train(adapter, model, optimizer, steps) -> None:
    for step in steps:
        adapter.train_step(model, optimizer, batch(step))


@pytest.mark.parametrize("framework", frameworks.NAMES)
def test_load_mismatch_lists_every_key_and_leaves_model_unchanged(framework):
    adapter = frameworks.get(framework)
    model = WL.build(framework, CFG)
    before = adapter.to_canonical(model)
    bad = {k: v + 1.0 for k, v in before.items() if k != "gn.bias"}
    bad["bn.num_batches_tracked"] = np.array(0, dtype=np.int64)
    bad["head.weight"] = bad["head.weight"].T.copy()
    bad["ln.weight"] = bad["ln.weight"].astype(np.float64)
    with pytest.raises(CheckpointMismatch) as info:
        adapter.load_canonical(model, bad)
    err = info.value
    assert err.missing == ["gn.bias"] and err.unexpected == ["bn.num_batches_tracked"]
    assert [k for k, _, _ in err.misshapen] == ["head.weight", "ln.weight"]
    after = adapter.to_canonical(model)
    assert all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("framework", frameworks.NAMES)
def test_set_trainable_freezes_the_rest_bit_identically(framework):
    adapter = frameworks.get(framework)
    tree = WL.init_canonical(CFG, seed=3)
    model = WL.build(framework, CFG, weights=tree)
    adapter.set_trainable(model, lambda name: name.startswith("head."))
    assert sorted(adapter.trainable_names(model)) == ["head.bias", "head.weight"]
    _, grads = adapter.loss_and_grads(model, batch(0))
    assert sorted(grads) == ["head.bias", "head.weight"]
    optimizer = adapter.make_optimizer(OPTIMIZERS["adamw"], SCHEDULE, model)
    assert {k.split("/", 1)[1] for k in optimizer.state_dict() if k != "step"} == set(grads)
    train(adapter, model, optimizer, range(2))
    after = adapter.to_canonical(model)
    for name, value in tree.items():
        moved = not np.array_equal(after[name], value)
        # BatchNorm statistics are buffers: train mode updates them whatever is frozen.
        assert moved == (name.startswith("head.") or name in BUFFERS), name
    adapter.set_trainable(model, lambda name: True)  # and back: everything trains again
    assert sorted(adapter.trainable_names(model)) == sorted(k for k in tree if k not in BUFFERS)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("framework", frameworks.NAMES)
def test_resuming_from_canonical_state_continues_bit_identically(framework, opt_name):
    adapter, spec = frameworks.get(framework), OPTIMIZERS[opt_name]
    model = WL.build(framework, CFG)
    optimizer = adapter.make_optimizer(spec, SCHEDULE, model)
    train(adapter, model, optimizer, range(3))
    weights, state = adapter.to_canonical(model), optimizer.state_dict()
    assert int(state["step"]) == 3 and state["step"].dtype == np.int64
    assert set(state) == {"step"} | {
        f"{slot}/{name}" for slot in spec.slots for name in adapter.trainable_names(model)
    }
    for key, value in state.items():  # slots are in canonical layout, like their parameter
        if key != "step":
            assert value.shape == weights[key.split("/", 1)[1]].shape, key
    train(adapter, model, optimizer, range(3, 6))

    resumed = WL.build(framework, CFG, weights=weights)
    resumed_opt = adapter.make_optimizer(spec, SCHEDULE, resumed)
    resumed_opt.load_state_dict(state)
    train(adapter, resumed, resumed_opt, range(3, 6))
    a, b = adapter.to_canonical(model), adapter.to_canonical(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("first,second", list(itertools.permutations(frameworks.NAMES, 2)))
def test_training_moves_to_another_framework_mid_run(first, second):
    """Three LAMB steps in one framework, three in another, equal to six in the first."""
    spec = OPTIMIZERS["lamb"]
    a, b = frameworks.get(first), frameworks.get(second)
    model = WL.build(first, CFG)
    optimizer = a.make_optimizer(spec, SCHEDULE, model)
    train(a, model, optimizer, range(3))
    weights, state = a.to_canonical(model), optimizer.state_dict()
    train(a, model, optimizer, range(3, 6))

    moved = WL.build(second, CFG, weights=weights)
    moved_opt = b.make_optimizer(spec, SCHEDULE, moved)
    moved_opt.load_state_dict(state)
    train(b, moved, moved_opt, range(3, 6))
    expected, got = a.to_canonical(model), b.to_canonical(moved)
    worst = max(errors(got[k], expected[k])[1] for k in expected)
    assert worst <= STEP_RTOL
    assert int(moved_opt.state_dict()["step"]) == 6

"""The JAX adapter: layout rules against PyTorch layers, strict loading, BatchNorm, training."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

pytestmark = pytest.mark.requires("jax", "torch")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import mlperf_tutor as mt  # noqa: E402
from mlperf_tutor import frameworks  # noqa: E402
from mlperf_tutor.core import (  # noqa: E402
    CheckpointMismatch,
    OptimizerSpec,
    ReferenceOptimizer,
    ScheduleSpec,
)
from mlperf_tutor.layers.jax.norms import BatchNorm  # noqa: E402

fj = frameworks.get("jax")
TOY = mt.workloads.get("toy")


@pytest.fixture(scope="module")
def cfg():
    return TOY.config("tiny")


@pytest.fixture(scope="module")
def tree(cfg):
    return TOY.init_canonical(cfg, seed=0)


@pytest.fixture(scope="module")
def batch(cfg):
    return TOY.synthetic_batch(cfg, batch_size=4, seed=0)


@pytest.fixture
def model(cfg, tree):
    return TOY.build("jax", cfg, weights=tree)


def randomise(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Random values for every entry (norm weights too, so a swapped leaf shows); canonical."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen))
    return {k: v.numpy().copy() for k, v in module.state_dict().items() if v.is_floating_point()}


def rngs():
    return nnx.Rngs(0)


# name: (torch module, NNX module, input shape, channels-first input?)
LAYERS = {
    "linear": (lambda: torch.nn.Linear(5, 3), lambda: nnx.Linear(5, 3, rngs=rngs()), (4, 5), 0),
    "conv1d": (
        lambda: torch.nn.Conv1d(3, 4, 3, padding=1),
        lambda: nnx.Conv(3, 4, (3,), padding=((1, 1),), rngs=rngs()),
        (2, 3, 7),
        1,
    ),
    "conv2d": (
        lambda: torch.nn.Conv2d(3, 4, 3, stride=2, padding=1),
        lambda: nnx.Conv(3, 4, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs()),
        (2, 3, 8, 8),
        1,
    ),
    "embed": (lambda: torch.nn.Embedding(10, 4), lambda: nnx.Embed(10, 4, rngs=rngs()), None, 0),
    "layernorm": (
        lambda: torch.nn.LayerNorm(6, eps=1e-5),
        lambda: nnx.LayerNorm(6, epsilon=1e-5, use_fast_variance=False, rngs=rngs()),
        (4, 6),
        0,
    ),
    "rmsnorm": (
        lambda: torch.nn.RMSNorm(6, eps=1e-6),
        lambda: nnx.RMSNorm(6, epsilon=1e-6, rngs=rngs()),
        (4, 6),
        0,
    ),
    "groupnorm": (
        lambda: torch.nn.GroupNorm(2, 6, eps=1e-5),
        lambda: nnx.GroupNorm(6, num_groups=2, epsilon=1e-5, use_fast_variance=False, rngs=rngs()),
        (2, 6, 3, 3),
        1,
    ),
    # Flax's own BatchNorm: the rule maps its leaves; eval mode only (its train-mode numbers
    # are not PyTorch's, which is why layers.jax.norms.BatchNorm exists).
    "nnx_batchnorm_eval": (
        lambda: torch.nn.BatchNorm2d(6, eps=1e-5).eval(),
        lambda: nnx.BatchNorm(6, epsilon=1e-5, use_running_average=True, rngs=rngs()),
        (2, 6, 3, 3),
        1,
    ),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layout_rule_matches_torch_layer(layer):
    make_torch, make_jax, shape, channels_first = LAYERS[layer]
    tm = make_torch()
    canonical = randomise(tm)
    jm = fj.init_empty(make_jax)
    fj.load_canonical(jm, canonical)
    back = fj.to_canonical(jm)
    assert back.keys() == canonical.keys()
    assert all(np.array_equal(back[k], canonical[k]) for k in canonical)
    rng = np.random.default_rng(0)
    if shape is None:
        x = rng.integers(0, 10, (2, 5))
        expected = tm(torch.from_numpy(x)).detach().numpy()
        got = np.asarray(jm(jnp.asarray(x, jnp.int32)))
    else:
        x = rng.standard_normal(shape, dtype=np.float32)
        expected = tm(torch.from_numpy(x)).detach().numpy()
        x_jax = np.moveaxis(x, 1, -1) if channels_first else x
        got = np.asarray(jm(jnp.asarray(x_jax)))
        got = np.moveaxis(got, -1, 1) if channels_first else got
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_batchnorm_matches_torch_in_train_and_eval():
    tm = torch.nn.BatchNorm2d(6, eps=1e-5, momentum=0.1)
    canonical = randomise(tm)
    jm = BatchNorm(6, momentum=0.1, epsilon=1e-5)
    fj.load_canonical(jm, canonical)
    call = nnx.jit(lambda m, x: m(x))
    rng = np.random.default_rng(0)
    jm.train()
    for _ in range(2):
        x = rng.standard_normal((3, 6, 4, 4), dtype=np.float32)
        expected = tm(torch.from_numpy(x)).detach().numpy()
        got = np.moveaxis(np.asarray(call(jm, jnp.asarray(np.moveaxis(x, 1, -1)))), -1, 1)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    state, torch_state = fj.to_canonical(jm), tm.state_dict()
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(state[name], torch_state[name].numpy(), rtol=0, atol=1e-6)
    jm.eval()
    tm.eval()
    assert jm.use_running_average
    x = rng.standard_normal((3, 6, 4, 4), dtype=np.float32)
    got = np.moveaxis(np.asarray(call(jm, jnp.asarray(np.moveaxis(x, 1, -1)))), -1, 1)
    np.testing.assert_allclose(got, tm(torch.from_numpy(x)).detach().numpy(), rtol=0, atol=1e-5)
    assert np.array_equal(fj.to_canonical(jm)["running_var"], state["running_var"])


def test_flip_bn_momentum_is_its_own_inverse():
    assert fj.flip_bn_momentum(0.1) == pytest.approx(0.9)
    assert fj.flip_bn_momentum(fj.flip_bn_momentum(0.01)) == pytest.approx(0.01)


def test_bf16_survives_conversion():
    linear = fj.init_empty(lambda: nnx.Linear(4, 3, param_dtype=jnp.bfloat16, rngs=rngs()))
    rng = np.random.default_rng(0)
    tree = {
        "weight": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
        "bias": rng.standard_normal(3).astype(ml_dtypes.bfloat16),
    }
    fj.load_canonical(linear, tree)
    out = fj.to_canonical(linear)
    for k in tree:
        assert out[k].dtype == np.dtype(ml_dtypes.bfloat16)
        assert out[k].tobytes() == tree[k].tobytes()
    with pytest.raises(CheckpointMismatch, match="float32"):
        fj.load_canonical(linear, {k: v.astype(np.float32) for k, v in tree.items()})


def test_flax_layer_without_rule_is_refused():
    class Holder(nnx.Module):
        def __init__(self):
            self.proj = nnx.LinearGeneral(4, (2, 3), rngs=rngs())

    with pytest.raises(ValueError, match=r"proj\.bias.*proj\.kernel.*register_rules"):
        fj.to_canonical(fj.init_empty(Holder))


def test_train_and_eval_forward_update_statistics_only_in_train(model, batch):
    stats = {k: v for k, v in fj.to_canonical(model).items() if "running" in k}
    eval_out = fj.forward(model, batch, train=False)
    assert all(np.array_equal(fj.to_canonical(model)[k], v) for k, v in stats.items())
    loss, grads = fj.loss_and_grads(model, batch, train=True)
    assert not np.array_equal(fj.to_canonical(model)["bn.running_var"], stats["bn.running_var"])
    assert model.bn.use_running_average is False  # the adapter's mode did not stick
    assert eval_out["logits"].shape == (4, TOY.config("tiny").num_classes)
    assert loss == pytest.approx(float(fj.forward(model, batch, train=True)["loss"]), rel=1e-6)
    shapes = {k: v.shape for k, v in fj.to_canonical(model).items()}
    assert sorted(grads) == sorted(fj.trainable_names(model))
    assert all(grads[k].shape == shapes[k] for k in grads)  # canonical layouts


def test_train_step_reduces_loss_and_compiles_once(model, batch, cfg):
    spec, schedule = TOY.optimizer(cfg)
    opt = fj.make_optimizer(spec, schedule, model)
    losses = [fj.train_step(model, opt, batch)]
    traces = opt.trace_count
    losses += [fj.train_step(model, opt, batch) for _ in range(11)]
    assert opt.trace_count == traces
    assert losses[-1] < 0.6 * losses[0]
    assert opt.step_count == 12
    with pytest.raises(ValueError, match="different model"):
        fj.train_step(TOY.build("jax", cfg), opt, batch)


def test_seed_and_devices():
    key = fj.seed(3)
    assert key.shape == ()
    assert fj.devices() and "jax" in fj.device_summary()
    assert "\n" not in fj.device_summary()


def test_float64_array_optimizer_computes_in_float64_and_leaves_x64_off():
    import jax

    spec, schedule = OptimizerSpec("adamw", weight_decay=0.1), ScheduleSpec(1e-2)
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    opt = fj.make_array_optimizer(spec, schedule, params)
    opt.step(grads)
    expected = ReferenceOptimizer(spec, schedule, params).step(params, grads)
    for k, v in opt.params().items():
        assert v.dtype == np.float64
        np.testing.assert_allclose(v, expected[k], rtol=1e-12)  # float32 math would miss by 1e-8
    assert not jax.config.read("jax_enable_x64")
    assert jnp.ones(1).dtype == jnp.float32

"""The PyTorch adapter on the toy workload: layout, bf16, gradients, training, optimizer state."""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest

pytestmark = pytest.mark.requires("torch")

import torch  # noqa: E402

import mlperf_tutor.workloads as workloads  # noqa: E402
from mlperf_tutor.core import CheckpointMismatch, OptimizerSpec, ScheduleSpec  # noqa: E402
from mlperf_tutor.frameworks import torch as adapter  # noqa: E402

WL = workloads.get("toy")
CFG = WL.config("tiny")


def build():
    return WL.build("torch", CFG)


def batch(seed=0):
    return WL.synthetic_batch(CFG, batch_size=4, seed=seed)


def test_param_count_matches_torch_model():
    model = build()
    assert sum(p.numel() for p in model.parameters()) == WL.param_count(CFG)
    assert adapter.trainable_names(model) == [n for n, _ in model.named_parameters()]


def test_bf16_survives_to_canonical_and_load_canonical():
    model = build().to(torch.bfloat16)
    tree = adapter.to_canonical(model)
    assert {v.dtype for v in tree.values()} == {np.dtype(ml_dtypes.bfloat16)}
    bits = tree["conv1.weight"].view(np.int16)
    np.testing.assert_array_equal(bits, model.conv1.weight.detach().view(torch.int16).numpy())
    changed = {k: (v.astype(np.float32) * 3).astype(ml_dtypes.bfloat16) for k, v in tree.items()}
    adapter.load_canonical(model, changed)
    for name, value in adapter.to_canonical(model).items():
        np.testing.assert_array_equal(value.view(np.int16), changed[name].view(np.int16))
    with pytest.raises(CheckpointMismatch, match="conv1.weight"):  # float32 is not bf16
        adapter.load_canonical(
            model, {**changed, "conv1.weight": tree["conv1.weight"].astype(np.float32)}
        )


@pytest.mark.parametrize("dtype", [np.float64, np.int32, ml_dtypes.bfloat16])
def test_numpy_roundtrip_keeps_dtype_and_does_not_alias(dtype):
    a = np.arange(6).reshape(2, 3)[:, ::-1].astype(dtype)
    t = adapter.from_numpy(a)
    back = adapter.to_numpy(t)
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, a)
    t.zero_()
    assert a[0, 0] != 0  # the tensor is a copy
    assert adapter.from_numpy(a, dtype="float32").dtype == torch.float32


def test_forward_eval_keeps_and_train_updates_bn_statistics():
    model = build()
    out = adapter.forward(model, batch())
    assert out["logits"].shape == (4, CFG.num_classes) and out["loss"].shape == ()
    mean = adapter.to_canonical(model)["bn.running_mean"]
    np.testing.assert_array_equal(mean, WL.init_canonical(CFG)["bn.running_mean"])
    adapter.forward(model, batch(), train=True)
    assert not np.array_equal(adapter.to_canonical(model)["bn.running_mean"], mean)


def test_loss_and_grads_match_float64_autograd_and_finite_differences():
    model = build()
    loss, grads = adapter.loss_and_grads(model, batch())
    assert set(grads) == set(adapter.trainable_names(model))
    model64 = copy.deepcopy(model).double()
    loss64, grads64 = adapter.loss_and_grads(model64, batch())
    assert abs(loss - loss64) <= 1e-6 * abs(loss64)
    for name, g in grads.items():
        rel = np.linalg.norm(g - grads64[name]) / np.linalg.norm(grads64[name])
        assert rel <= 1e-4, name
    # Central differences in float64 on a few elements, in train mode like the gradients.
    params = dict(model64.named_parameters())
    h = 1e-6
    for name, index in [
        ("conv1.weight", (1, 2, 0, 1)),
        ("bn.weight", (3,)),
        ("gn.bias", (0,)),
        ("embed.weight", (int(batch()["tokens"][0, 0]), 2)),
        ("ln.weight", (5,)),
        ("head.bias", (1,)),
    ]:
        p = params[name]
        with torch.no_grad():
            p[index] += h
            up = adapter.forward(model64, batch(), train=True)["loss"]
            p[index] -= 2 * h
            down = adapter.forward(model64, batch(), train=True)["loss"]
            p[index] += h
        numeric = (up - down) / (2 * h)
        assert abs(grads[name][index] - numeric) <= 1e-5 + 1e-4 * abs(numeric), name


def test_train_step_reduces_loss():
    model = build()
    spec, schedule = WL.optimizer(CFG)
    opt = adapter.make_optimizer(spec, schedule, model)
    fixed = batch()
    losses = [adapter.train_step(model, opt, fixed) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert opt.step_count == 20


def test_no_decay_parameters_get_no_weight_decay():
    spec, schedule = WL.optimizer(CFG)
    opt = adapter.make_optimizer(spec, schedule, build())
    by_id = {id(p): n for n, p in opt.named.items()}
    for group in opt.native.param_groups:
        names = [by_id[id(p)] for p in group["params"]]
        assert all(spec.decays(n) == (group["weight_decay"] > 0) for n in names), names


def test_optimizer_state_before_first_step_exports_initial_values():
    params = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    sgd = adapter.make_array_optimizer(
        OptimizerSpec("sgd", momentum=0.9), ScheduleSpec(0.1), params
    )
    state = sgd.state_dict()
    assert sorted(state) == ["momentum_buffer/b", "momentum_buffer/w", "step"]
    assert state["step"].dtype == np.int64 and int(state["step"]) == 0
    assert not state["momentum_buffer/w"].any()
    adagrad = adapter.make_array_optimizer(
        OptimizerSpec("adagrad", initial_accumulator=0.1), ScheduleSpec(0.1), params
    )
    np.testing.assert_array_equal(adagrad.state_dict()["sum/w"], np.full((2, 3), 0.1, np.float32))


def test_optimizer_state_with_wrong_shape_is_refused_and_nothing_changes():
    params = {"w": np.ones((2, 3), np.float64)}
    opt = adapter.make_array_optimizer(OptimizerSpec("adam"), ScheduleSpec(0.1), params)
    opt.step({"w": np.full((2, 3), 0.5)})
    state = opt.state_dict()
    bad = {**state, "exp_avg/w": np.zeros((3, 2)), "exp_avg/x": np.zeros(1)}
    with pytest.raises(ValueError, match=r"exp_avg/w.*exp_avg/x|exp_avg/x.*exp_avg/w"):
        opt.load_state_dict(bad)
    for key, value in opt.state_dict().items():
        np.testing.assert_array_equal(value, state[key])


def test_clipping_has_no_epsilon():
    # torch.nn.utils.clip_grad_norm_ would scale by 1 / (2 + 1e-6) here, not exactly 1/2.
    opt = adapter.make_array_optimizer(
        OptimizerSpec("sgd", clip_norm=1.0), ScheduleSpec(1.0), {"w": np.zeros(4)}
    )
    opt.step({"w": np.full(4, 1.0)})  # global norm 2
    np.testing.assert_array_equal(opt.params()["w"], np.full(4, -0.5))


def test_devices_precision_and_seed():
    assert adapter.devices()[0] == "cpu"
    adapter.pin_precision()
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    summary = adapter.device_summary()
    assert "\n" not in summary and "TF32 off" in summary
    adapter.seed(3)
    a = torch.rand(3)
    adapter.seed(3)
    assert torch.equal(a, torch.rand(3))


def test_parameter_without_gradient_is_updated_with_zero_gradient():
    # As in the spec (and optax/Keras): AdamW still decays a parameter the loss does not use.
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 1), "unused": torch.nn.Linear(2, 1)})
    opt = adapter.make_optimizer(OptimizerSpec("adamw", weight_decay=0.5), ScheduleSpec(0.1), model)
    before = model["unused"].weight.detach().clone()
    model["used"](torch.ones(1, 2)).sum().backward()
    opt.step()
    torch.testing.assert_close(model["unused"].weight.detach(), before * (1 - 0.1 * 0.5))

"""The TensorFlow adapter: layout rules against PyTorch, strict loading, bf16, BatchNorm
semantics, training and optimizer state, on single layers and the toy workload."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

pytestmark = pytest.mark.requires("tf", "torch")

import keras  # noqa: E402
import torch  # noqa: E402

from mlperf_tutor import workloads  # noqa: E402
from mlperf_tutor.core import CheckpointMismatch  # noqa: E402
from mlperf_tutor.frameworks import tf as adapter  # noqa: E402
from mlperf_tutor.layers.tf.norms import BatchNorm  # noqa: E402
from mlperf_tutor.workloads.toy import tf_model  # noqa: E402

WL = workloads.get("toy")
CFG = WL.config("tiny")


def batch(seed=0):
    return WL.synthetic_batch(CFG, batch_size=4, seed=seed)


@pytest.fixture(scope="module")
def model():
    """A toy model with init_canonical(seed=0); tests that change it build their own."""
    return WL.build("tf", CFG)


def test_bf16_weights_survive_and_are_not_upcast():
    m = tf_model.build(CFG, dtype="bfloat16")
    tree = {k: v.astype(ml_dtypes.bfloat16) for k, v in WL.init_canonical(CFG, seed=1).items()}
    adapter.load_canonical(m, tree)
    exported = adapter.to_canonical(m)
    for name, value in tree.items():
        assert exported[name].dtype == np.dtype(ml_dtypes.bfloat16), name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    assert np.isfinite(adapter.forward(m, batch())["loss"])
    with pytest.raises(CheckpointMismatch, match="bfloat16"):
        adapter.load_canonical(m, WL.init_canonical(CFG, seed=1))  # float32 into bf16: refused


class Holder(keras.Model):
    """One layer under the attribute ``layer``, so its canonical names are ``layer.<leaf>``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def call(self, x, training=False):
        return (
            self.layer(x, training=training) if isinstance(self.layer, BatchNorm) else self.layer(x)
        )


def _channels_last(x):
    return np.moveaxis(x, 1, -1)


def _channels_first(x):
    return np.moveaxis(x, -1, 1)


_rng = np.random.default_rng(0)
# name -> (keras layer, torch module, input in PyTorch layout). Odd sizes and non-square kernels
# so that a swapped axis cannot go unnoticed.
LAYERS = {
    "Dense": lambda: (keras.layers.Dense(3), torch.nn.Linear(4, 3), (2, 4)),
    "Conv1D": lambda: (
        keras.layers.Conv1D(3, 3, strides=2),
        torch.nn.Conv1d(4, 3, 3, 2),
        (2, 4, 7),
    ),
    "Conv2D": lambda: (
        keras.layers.Conv2D(3, (3, 2), strides=(2, 1)),
        torch.nn.Conv2d(4, 3, (3, 2), (2, 1)),
        (2, 4, 7, 5),
    ),
    "Conv3D": lambda: (
        keras.layers.Conv3D(2, (3, 2, 1)),
        torch.nn.Conv3d(3, 2, (3, 2, 1)),
        (2, 3, 4, 3, 2),
    ),
    "Embedding": lambda: (keras.layers.Embedding(7, 3), torch.nn.Embedding(7, 3), None),
    "LayerNormalization": lambda: (
        keras.layers.LayerNormalization(epsilon=1e-5),
        torch.nn.LayerNorm(5, eps=1e-5),
        (2, 3, 5),
    ),
    "GroupNormalization": lambda: (
        keras.layers.GroupNormalization(2, epsilon=1e-5),
        torch.nn.GroupNorm(2, 6, eps=1e-5),
        (2, 6, 3, 4),
    ),
    "RMSNormalization": lambda: (
        keras.layers.RMSNormalization(epsilon=1e-6),
        torch.nn.RMSNorm(5, eps=1e-6),
        (2, 3, 5),
    ),
    "BatchNormalization": lambda: (
        keras.layers.BatchNormalization(epsilon=1e-5),
        torch.nn.BatchNorm2d(4, eps=1e-5).eval(),
        (2, 4, 3, 3),
    ),
    "BatchNorm": lambda: (BatchNorm(0.1, 1e-5), torch.nn.BatchNorm2d(4).eval(), (2, 4, 3, 3)),
}
CHANNELS_FIRST = {
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "GroupNormalization",
    "BatchNormalization",
    "BatchNorm",
}


def _torch_tree(module) -> dict[str, np.ndarray]:
    with torch.no_grad():  # random norm weights and statistics, so a layout slip shows
        for name, tensor in module.state_dict().items():
            if name.endswith(("weight", "bias", "running_mean")):
                tensor.copy_(torch.randn(tensor.shape) * 0.5 + (name == "weight"))
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape) + 0.5)
    return {
        f"layer.{k}": v.numpy().copy()
        for k, v in module.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layout_rule_matches_torch_module(kind):
    torch.manual_seed(0)
    layer, module, shape = LAYERS[kind]()
    if shape is None:
        x_torch = np.random.default_rng(0).integers(0, 7, (2, 5))
    else:
        x_torch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x_keras = _channels_last(x_torch) if kind in CHANNELS_FIRST else x_torch
    holder = Holder(layer)
    holder(x_keras)
    tree = _torch_tree(module)
    adapter.load_canonical(holder, tree)
    exported = adapter.to_canonical(holder)
    assert list(exported) == list(tree)
    assert all(np.array_equal(exported[k], tree[k]) for k in tree)
    got = adapter.to_numpy(holder(x_keras))
    with torch.no_grad():
        want = module(torch.as_tensor(x_torch)).numpy()
    if kind in CHANNELS_FIRST:
        got = _channels_first(got)
    assert np.abs(got - want).max() <= 1e-5, kind


def test_batchnorm_statistics_follow_torch():
    torch.manual_seed(0)
    ours, ref = Holder(BatchNorm(0.1, 1e-5)), torch.nn.BatchNorm2d(6, momentum=0.1, eps=1e-5)
    rng = np.random.default_rng(1)
    xs = [(2.0 * rng.standard_normal((3, 6, 4, 5)) + 1.5).astype(np.float32) for _ in range(3)]
    ours(_channels_last(xs[0]))
    adapter.load_canonical(ours, _torch_tree(ref))
    for x in xs:  # training: batch statistics, running ones updated with the unbiased variance
        got = _channels_first(adapter.to_numpy(ours(_channels_last(x), training=True)))
        want = ref.train()(torch.as_tensor(x)).detach().numpy()
        assert np.abs(got - want).max() <= 1e-5
    stats = adapter.to_canonical(ours)
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(stats[f"layer.{name}"], getattr(ref, name).numpy(), atol=1e-6)
    got = _channels_first(adapter.to_numpy(ours(_channels_last(xs[0]), training=False)))
    want = ref.eval()(torch.as_tensor(xs[0])).detach().numpy()
    assert np.abs(got - want).max() <= 1e-5
    assert adapter.trainable_names(ours) == ["layer.weight", "layer.bias"]


def test_canonical_names_follow_attribute_paths_not_keras_scopes():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.proj = keras.layers.Dense(2, name="proj")
            self.scale = self.add_weight(shape=(2,), name="scale")

        def call(self, x):
            return self.proj(x) * self.scale

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.blocks = [Block(name=f"blocks_{i}") for i in range(2)]
            self.heads = {"cls": keras.layers.Dense(1, name="cls")}

        def call(self, x):
            for block in self.blocks:
                x = block(x)
            return self.heads["cls"](x)

    net = Net()
    with keras.name_scope("outer"):  # Keras paths get this prefix; canonical names must not
        net(np.zeros((1, 2), np.float32))
    assert list(adapter.to_canonical(net)) == [
        "blocks.0.scale",
        "blocks.0.proj.weight",
        "blocks.0.proj.bias",
        "blocks.1.scale",
        "blocks.1.proj.weight",
        "blocks.1.proj.bias",
        "heads.cls.weight",
        "heads.cls.bias",
    ]


def test_builtin_layer_without_rule_is_named_in_the_error():
    holder = Holder(keras.layers.PReLU())
    holder(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="'alpha' of layer 'layer' \\(PReLU\\)"):
        adapter.to_canonical(holder)


def test_train_step_reduces_loss_without_retracing():
    m = WL.build("tf", CFG)
    spec, schedule = WL.optimizer(CFG)
    opt = adapter.make_optimizer(spec, schedule, m)
    fixed = batch(3)
    losses = [adapter.train_step(m, opt, fixed) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert opt._train_fn.experimental_get_tracing_count() == 1
    assert int(opt.state_dict()["step"]) == 15
    with pytest.raises(ValueError, match="another model"):
        adapter.train_step(WL.build("tf", CFG), opt, fixed)


def test_loss_and_grads_are_canonical_and_match_train_mode(model):
    loss, grads = adapter.loss_and_grads(model, batch(1), train=False)
    assert loss == pytest.approx(float(adapter.forward(model, batch(1))["loss"]), abs=1e-6)
    assert list(grads) == adapter.trainable_names(model)
    specs = WL.canonical_specs(CFG)
    assert all(grads[k].shape == specs[k][0] for k in grads)


def test_device_functions():
    assert any("CPU" in d for d in adapter.devices())
    summary = adapter.device_summary()
    assert summary.startswith("TensorFlow") and "\n" not in summary
    adapter.pin_precision()
    adapter.seed(0)
    a = adapter.from_numpy(np.ones(3, ml_dtypes.bfloat16))
    assert adapter.to_numpy(a).dtype == np.dtype(ml_dtypes.bfloat16)
    assert adapter.to_numpy(adapter.from_numpy(np.ones(2), dtype="float32")).dtype == np.float32


def _run(code: str, **env) -> subprocess.CompletedProcess:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL")
    }
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
    )


def test_import_sets_environment_only_where_unset():
    code = (
        "import os, sys, mlperf_tutor\n"
        "assert 'tensorflow' not in sys.modules\n"
        "import mlperf_tutor.frameworks.tf\n"
        "print(os.environ['KERAS_BACKEND'], os.environ['TF_CPP_MIN_LOG_LEVEL'])\n"
    )
    out = _run(code, TF_CPP_MIN_LOG_LEVEL="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["tensorflow", "1"]


def test_import_refuses_keras_on_another_backend():
    out = _run("import keras; import mlperf_tutor.frameworks.tf", KERAS_BACKEND="numpy")
    assert out.returncode != 0
    assert "set the environment variable KERAS_BACKEND=tensorflow" in out.stderr

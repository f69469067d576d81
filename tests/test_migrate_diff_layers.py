"""mlperf_tutor.parity.diff_layers: the first diverging module of a hand port to Flax NNX."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.requires("torch", "jax")

import jax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from torch import nn  # noqa: E402

import mlperf_tutor as mt  # noqa: E402
from mlperf_tutor.parity import diff_layers  # noqa: E402

D, F, LAYERS = 16, 32, 3


class TorchMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(D, F)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(F, D)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class TorchBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D, eps=1e-5)
        self.mlp = TorchMlp()

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TorchStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.blocks = nn.ModuleList(TorchBlock() for _ in range(LAYERS))
        self.final_norm = nn.LayerNorm(D, eps=1e-5)
        self.head = nn.Linear(D, 4)

    def forward(self, batch):
        x = self.embed(batch["x"])
        for block in self.blocks:
            x = block(x)
        return {"logits": self.head(self.final_norm(x))}


class Gelu(nnx.Module):
    def __init__(self, approximate: bool):
        self.approximate = approximate

    def __call__(self, x):
        return nnx.gelu(x, approximate=self.approximate)


class NnxMlp(nnx.Module):
    """``act`` is a module (named as torch's) or, with act_module=False, a plain function."""

    def __init__(self, *, approximate: bool, act_module: bool, rngs: nnx.Rngs):
        self.fc_in = nnx.Linear(D, F, rngs=rngs)
        self.act = Gelu(approximate) if act_module else None
        self.approximate = approximate
        self.fc_out = nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x):
        h = self.fc_in(x)
        h = self.act(h) if self.act is not None else nnx.gelu(h, approximate=self.approximate)
        return self.fc_out(h)


class NnxBlock(nnx.Module):
    def __init__(self, *, eps: float, approximate: bool, act_module: bool, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(D, epsilon=eps, use_fast_variance=False, rngs=rngs)
        self.mlp = NnxMlp(approximate=approximate, act_module=act_module, rngs=rngs)

    def __call__(self, x):
        return x + self.mlp(self.norm(x))


class NnxStack(nnx.Module):
    def __init__(self, *, tanh_at=None, eps_at=None, act_module=True, rngs: nnx.Rngs):
        self.embed = nnx.Linear(8, D, rngs=rngs)
        self.blocks = nnx.List(
            NnxBlock(
                eps=1e-1 if i == eps_at else 1e-5,  # planted bug (b)
                approximate=i == tanh_at,  # planted bug (a)
                act_module=act_module,
                rngs=rngs,
            )
            for i in range(LAYERS)
        )
        self.final_norm = nnx.LayerNorm(D, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.head = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, batch):
        x = self.embed(batch["x"])
        for block in self.blocks:
            x = block(x)
        return {"logits": self.head(self.final_norm(x))}


def _copy_weights(torch_model, nnx_model):
    """Torch weights into the NNX port: Linear kernels transposed, LayerNorm weight -> scale."""
    modules = dict(nnx.iter_modules(nnx_model))
    for name, value in torch_model.state_dict().items():
        *path, leaf = name.split(".")
        target = modules[tuple(int(p) if p.isdigit() else p for p in path)]
        array = value.numpy()
        if isinstance(target, nnx.Linear) and leaf == "weight":
            target.kernel.set_value(jax.numpy.asarray(array.T))
        else:
            getattr(target, {"weight": "scale"}.get(leaf, leaf)).set_value(jax.numpy.asarray(array))


def _pair(**bugs):
    torch.manual_seed(0)
    reference = TorchStack()
    port = NnxStack(**bugs, rngs=nnx.Rngs(0))
    _copy_weights(reference, port)
    # Unit-scale activations: GELU's tanh approximation is off by ~1e-3 there, and eps 1e-1 is a
    # tenth of the LayerNorm's variance.
    batch = {"x": np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32) * 3}
    return reference, port, batch


def test_faithful_port_passes_every_module():
    report = diff_layers(*_pair())
    assert report.ok, report
    assert report.first_divergence is None
    names = [row.name for row in report.rows]
    assert names[:4] == ["<root>", "embed", "blocks.0", "blocks.0.norm"]  # torch call order
    assert all(row.status == "ok" for row in report.rows), report
    assert report["blocks.1.mlp.fc_in"].shape == (2, 5, F)
    assert report["blocks.1.mlp.fc_in"].max_abs <= 1e-5
    assert report.unmatched_jax == []


def test_gelu_tanh_named_at_the_act_module():
    report = diff_layers(*_pair(tanh_at=1))
    assert not report.ok
    assert report.first_divergence == "blocks.1.mlp.act", report
    assert report["blocks.1.mlp.fc_in"].ok and report["blocks.0"].ok
    assert report["blocks.1.mlp.act"].status == "diff" and report["blocks.1.mlp.act"].inputs_ok
    assert "first divergence: blocks.1.mlp.act" in str(report)


def test_gelu_as_function_named_at_the_enclosing_module():
    report = diff_layers(*_pair(tanh_at=1, act_module=False))
    assert report.first_divergence == "blocks.1.mlp", report
    assert report["blocks.1.mlp.act"].status == "missing"
    assert report["blocks.1.mlp.fc_out"].inputs_ok is False


def test_layernorm_eps_named_at_that_norm():
    report = diff_layers(*_pair(eps_at=2))
    assert report.first_divergence == "blocks.2.norm", report
    assert report["blocks.2.norm"].max_abs > 1e-3
    assert all(row.ok for row in report.rows if row.name.startswith(("blocks.0", "blocks.1")))


def test_report_dataframe_and_table():
    report = diff_layers(*_pair(eps_at=0))
    frame = report.to_dataframe()
    assert list(frame["name"])[:2] == ["<root>", "embed"]
    assert {"shape", "max_abs", "rel", "status", "ok"} <= set(frame.columns)
    assert not frame.set_index("name").loc["blocks.0.norm", "ok"]
    text = str(report)
    assert "blocks.0.norm" in text and "DIFF" in text


def test_torch_training_flags_restored_and_custom_call():
    reference, port, batch = _pair()
    reference.train()
    calls = []

    def torch_fn(model, b):
        calls.append("torch")
        return model(b)

    def jax_fn(model, b):
        calls.append("jax")
        return model(b)

    report = diff_layers(reference, port, batch, call=(torch_fn, jax_fn))
    assert report.ok and calls == ["torch", "jax"]
    assert all(m.training for m in reference.modules())


def test_nhwc_layout_transposes_conv_activations():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    port = nnx.Sequential(
        nnx.Conv(3, 4, kernel_size=(3, 3), padding=[(1, 1), (1, 1)], rngs=nnx.Rngs(0)), nnx.relu
    )
    conv = port.layers[0]
    conv.kernel.set_value(
        jax.numpy.asarray(reference[0].weight.detach().numpy().transpose(2, 3, 1, 0))
    )
    conv.bias.set_value(jax.numpy.asarray(reference[0].bias.detach().numpy()))
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32)
    report = diff_layers(
        reference,
        port,
        x,
        layout="NHWC",
        call=(lambda m, b: m(b), lambda m, b: m(b.transpose(0, 2, 3, 1))),
    )
    assert report["0"].status == "ok" and report.ok, report  # nnx.Sequential's "layers" dropped


def test_gpt3_workload_torch_vs_jax_all_modules_pass():
    wl = mt.workloads.get("gpt3")
    cfg = wl.deterministic(wl.config("tiny", seq_len=128))
    tree = wl.init_canonical(cfg, seed=0)
    batch = wl.synthetic_batch(cfg, batch_size=2, seed=0)
    report = diff_layers(
        wl.build("torch", cfg, weights=tree), wl.build("jax", cfg, weights=tree), batch
    )
    assert report.ok, report
    assert report.first_divergence is None
    compared = {row.name for row in report.compared}
    assert {"blocks.0.attention.q_proj", "blocks.0.mlp.fc_out", "final_norm", "<root>"} <= compared

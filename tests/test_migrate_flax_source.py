"""mlperf_tutor.migrate.flax_source.to_flax_source: torch modules -> Flax NNX source code."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.requires("torch", "jax")

import jax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402
from torch import nn  # noqa: E402

from mlperf_tutor.migrate.flax_source import (  # noqa: E402
    UnsupportedModuleError,
    VerificationError,
    to_flax_source,
)

RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


class MlpBlock(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc_in = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc_out(self.act(self.fc_in(self.norm(x))))


class MlpStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([MlpBlock(16, 32), MlpBlock(16, 64), MlpBlock(16, 32)])
        self.head = nn.Sequential(nn.LayerNorm(16), nn.Dropout(0.1), nn.Linear(16, 4))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3x3 convs, a projection shortcut when shapes change."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layers = nn.ModuleList(
            [BasicBlock(8, 8), BasicBlock(8, 16, 2), BasicBlock(16, 16), BasicBlock(16, 32, 2)]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        for layer in self.layers:
            x = layer(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class Zoo(nn.Module):
    """The other supported layers and functional operations, in one forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 4, padding="same", dilation=2, groups=2)
        self.norm = nn.GroupNorm(4, 8, eps=1e-3)
        self.act = nn.SiLU()
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.leaky = nn.LeakyReLU(0.2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8 * 10 * 10, 12)
        self.bn = nn.BatchNorm1d(12, momentum=0.3, eps=1e-4)
        self.out = nn.Linear(12, 3, bias=False)

    def forward(self, x):
        h = self.pool(self.act(self.norm(self.conv(x))))
        h = self.flat(self.leaky(h) * 0.5 - torch.sigmoid(h))
        h = torch.tanh(self.bn(self.fc(h)))
        return self.out(F.gelu(h) + F.relu(h))


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(11, 6)
        self.mix = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Sigmoid())

    def forward(self, ids):
        return self.mix(self.tokens(ids)).flatten(1)


def _randomize_batchnorm(model):
    """Non-trivial running statistics and affine weights, so eval-mode BatchNorm is tested."""
    gen = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen))
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.weight.copy_(torch.randn(mod.num_features, generator=gen))
                mod.bias.copy_(torch.randn(mod.num_features, generator=gen))
    return model


def _import(code: str, tmp_path: Path, name: str):
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def _check_generated(model, x, tmp_path, name, *, atol=1e-5):
    """The generated file imports, runs and matches torch (eval mode); ruff-clean; returns it."""
    torch.manual_seed(0)
    source = to_flax_source(model, x)
    compile(source.code, f"{name}.py", "exec")
    module, path = _import(source.code, tmp_path, name)
    port = source.load_weights(getattr(module, source.class_name)(rngs=nnx.Rngs(0)))
    port.eval()
    model.eval()
    with torch.no_grad():
        want = model(x).numpy()
    inputs = x.permute(0, 2, 3, 1) if x.dim() == 4 else x
    got = np.asarray(port(jax.numpy.asarray(inputs.numpy())))
    got = got.transpose(0, 3, 1, 2) if got.ndim == 4 else got
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= atol
    assert source.verify(x, atol=atol) <= atol
    if RUFF:
        lint = subprocess.run(
            [RUFF, "check", "--isolated", "--line-length", "100", "--select", "E,F,W,I,B,UP", path],
            capture_output=True,
            text=True,
        )
        assert lint.returncode == 0, lint.stdout + source.code
    return source


def test_mlp_stack(tmp_path):
    torch.manual_seed(0)
    source = _check_generated(MlpStack(), torch.randn(3, 5, 8), tmp_path, "mlp_port")
    code = source.code
    # One class for three blocks; the width that differs between them becomes an argument.
    assert code.count("class MlpBlock(") == 1 and "class MlpBlock2" not in code
    assert "features: int" in code and "MlpBlock(features=64, rngs=rngs)" in code
    assert "nnx.gelu(h, approximate=True)" in code  # GELU's approximation kept
    assert "epsilon=1e-06" in code and "epsilon=1e-05" in code  # LayerNorm eps explicit
    assert "for block in self.blocks:" in code
    assert "nnx.Dropout(0.1, rngs=rngs)" in code
    assert "# (B, 5, 16)" in code  # shape comments
    weights = source.convert_weights()
    kernel = weights["blocks"][1]["fc_in"]["kernel"]
    assert kernel.shape == (16, 64)  # Linear (out, in) -> kernel (in, out)
    assert weights["head"]["layers"][0]["scale"].shape == (16,)
    # The nested dict is what nnx.replace_by_pure_dict takes.
    port = getattr(source.module(), source.class_name)(rngs=nnx.Rngs(1))
    state = nnx.state(port)
    nnx.replace_by_pure_dict(state, weights)
    nnx.update(port, state)
    np.testing.assert_array_equal(np.asarray(port.blocks[1].fc_in.kernel[...]), kernel)


def test_cnn_sequential(tmp_path):
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    source = _check_generated(_randomize_batchnorm(cnn), torch.randn(2, 3, 8, 8), tmp_path, "cnn")
    code = source.code
    assert "class Model(nnx.Sequential):" in code
    assert "padding=[(1, 1), (1, 1)]" in code and "momentum=0.9" in code  # 1 - torch's 0.1
    assert "NHWC" in code
    assert source.convert_weights()["layers"][0]["kernel"].shape == (3, 3, 3, 8)  # HWIO
    assert source.weight_map["1.running_var"] == (("layers", 1, "var"), None)


def test_resnet_basic_block_and_tiny_resnet(tmp_path):
    torch.manual_seed(0)
    block = _randomize_batchnorm(BasicBlock(4, 8, stride=2))
    source = _check_generated(block, torch.randn(2, 4, 8, 8), tmp_path, "block")
    assert "h = h + x" in source.code and "self.downsample = nnx.Sequential(" in source.code

    resnet = _randomize_batchnorm(TinyResNet())
    source = _check_generated(resnet, torch.randn(2, 3, 16, 16), tmp_path, "resnet")
    code = source.code
    # Identity blocks share one class (the width an argument); projection blocks another.
    assert code.count("(nnx.Module):") == 3
    assert "BasicBlock(features=8, rngs=rngs)" in code
    assert "BasicBlock(features=16, rngs=rngs)" in code
    assert "BasicBlock2(in_features=16, features=32, rngs=rngs)" in code


def test_other_layers_and_functional_ops(tmp_path):
    torch.manual_seed(0)
    source = _check_generated(
        _randomize_batchnorm(Zoo()), torch.randn(2, 4, 10, 10), tmp_path, "zoo"
    )
    code = source.code
    assert "momentum=0.7" in code and "feature_group_count=2" in code
    assert "count_include_pad=True" in code and "nnx.leaky_relu" in code
    ids = torch.tensor([[1, 2, 3], [4, 5, 10]])
    _check_generated(Embedder(), ids, tmp_path, "embedder")


def test_build_and_verify_raise_on_mismatch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    source = to_flax_source(model, torch.randn(2, 4))
    port = source.build()
    assert type(port).__name__ == "Model"
    with torch.no_grad():
        model[0].bias.add_(1.0)  # torch moves away from the weights verify() will load...
    assert source.verify(torch.randn(2, 4)) <= 1e-5  # ...but build() reloads them: still equal
    source.code = source.code.replace("approximate=False", "approximate=True")
    with pytest.raises(VerificationError, match="max-abs"):
        source.verify(torch.randn(2, 4) * 3)
    with pytest.raises(ValueError, match=r"missing keys \['0.bias'\]"):
        source.convert_weights({"0.weight": torch.zeros(4, 4)})


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cat([self.fc(x), x], dim=-1)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Concat())

    def forward(self, x):
        return self.inner(x)


class Recurrent(nn.Module):
    """Both recurrent layers (stacked, bidirectional, batch first or not) and attention."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(12, 5, bias=False)
        self.attn = nn.MultiheadAttention(5, 1, batch_first=True)
        self.cross = nn.MultiheadAttention(5, 5, dropout=0.1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = self.lstm(x)[0]  # (B, T, 12)
        h = self.gru(h.transpose(0, 1))[0].transpose(0, 1)  # GRU is time-major here
        h = h + self.attn(h, h, h, need_weights=False)[0]
        t = h.transpose(0, 1)
        return self.fc(self.cross(t, t, t)[0] * self.cross(t, t, t)[1].sum())


class Conv2dNormActivation(nn.Sequential):
    """torchvision's conv-norm-activation block: a Sequential subclass, children "0", "1", "2"."""

    def __init__(self, cin, cout, kernel=3):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(Conv2dNormActivation(3, 8), Conv2dNormActivation(8, 8, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.heads = nn.ModuleDict({"boxes": nn.Linear(8, 4), "gate": nn.Linear(8, 4)})

    def forward(self, x):
        h = torch.flatten(self.pool(self.features(x)), 1)
        return self.heads["boxes"](h) * torch.sigmoid(self.heads["gate"](h))


def test_sequential_subclass_and_module_dict(tmp_path):
    torch.manual_seed(0)
    model = _randomize_batchnorm(Heads())
    source = _check_generated(model, torch.randn(2, 3, 6, 6), tmp_path, "heads")
    code = source.code
    # One class for both blocks, its varying widths and kernel as arguments.
    assert "class Conv2dNormActivation(nnx.Sequential):" in code
    assert "Conv2dNormActivation(in_features=8, kernel_size=(1, 1)" in code
    assert "self.heads = nnx.Dict(" in code and "self.heads.gate(" in code
    assert source.weight_map["features.1.0.weight"] == (
        ("features", "layers", 1, "layers", 0, "kernel"),
        (2, 3, 1, 0),
    )


class Wrapper2(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Concat(), nn.BatchNorm1d(8), nn.ReLU())

    def forward(self, x):
        return self.inner(x)


def test_untranslatable_module_falls_back_to_the_interpreter(tmp_path):
    torch.manual_seed(0)
    model = _randomize_batchnorm(Wrapper2())
    source = _check_generated(model, torch.randn(3, 4), tmp_path, "fallback")
    code = source.code
    # The comment names the module and why; the rest stays readable Flax.
    assert "# Module 'inner.1' (Concat) is not readable Flax: node 'cat'" in code
    assert "_CONCAT_GRAPH = interpreted(" in code
    assert "nnx.BatchNorm(8, momentum=0.9" in code
    assert source.weight_map["inner.1.fc.weight"] == (("inner", "layers", 1, "fc__weight"), None)


def test_unsupported_module_raises_clear_error():
    with pytest.raises(UnsupportedModuleError, match=r"module 'inner.1' \(Concat\).*node 'cat'"):
        to_flax_source(Wrapper(), torch.randn(2, 4), fallback=False)
    lstm = nn.Sequential(nn.LSTM(4, 4, proj_size=2))
    with pytest.raises(UnsupportedModuleError, match=r"module '0' \(LSTM\).*proj_size"):
        to_flax_source(lstm, torch.randn(3, 2, 4), fallback=False)
    with pytest.raises(UnsupportedModuleError, match="single Linear layer"):
        to_flax_source(nn.Linear(2, 2), torch.randn(1, 2))

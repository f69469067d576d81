"""Random ops in a migrated step: translated with per-step keys (never silently dropped), and
turned off by verify in both frameworks (listed in its report).

Covered: nn.LSTM's dropout between layers (torch.export's own decomposition drops it),
stochastic depth from torch.rand and from bernoulli_, F.dropout with a literal rate, a random op
without a keyed translation (refused by name), and random numbers drawn by loss_fn outside the
model (verify refuses them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlperf_tutor.migrate import VerificationError, verify
from mlperf_tutor.migrate.export import translate
from mlperf_tutor.migrate.interpreter import UnsupportedOp

pytestmark = pytest.mark.requires("torch", "jax")


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: one bernoulli_ draw per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Residual(nn.Module):
    """A residual branch with stochastic depth from torch.rand inline (ConvNeXt-style)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        y = self.fc(x)
        if self.training:
            y = y * torch.floor(0.8 + torch.rand(x.shape[0], 1, dtype=x.dtype)) / 0.8
        return x + y


class Deep(nn.Module):
    """Two residual branches: one dropped by a DropPath module (bernoulli_), one by torch.rand
    inline in its block's forward; then F.dropout with a literal rate."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.drop_path = DropPath(0.2)
        self.block = Residual()

    def forward(self, x):
        x = self.block(x + self.drop_path(self.fc1(x)))
        return self.head(F.dropout(x, 0.1, training=True))


def loss_of(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def batch_of(seed: int, shape=(4, 6)) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal(shape).astype(np.float32), "y": rng.integers(0, 3, (4,))}


def train_losses(translation, batch, keys):
    params = {k: jnp.asarray(v) for k, v in translation.params.items()}
    return [float(translation.apply(params, {}, {}, batch, jax.random.PRNGKey(k))[0]) for k in keys]


def test_lstm_dropout_between_layers_is_translated_with_keys():
    torch.manual_seed(0)
    model = Recurrent().train()
    batch = batch_of(0, (4, 5, 4))
    translation = translate(model, loss_of, batch)
    sites = translation._train.random_sites()
    assert [(op, module) for op, _, module in sites] == [("aten.native_dropout.default", "rnn")]
    a, b = train_losses(translation, batch, [1, 2])
    assert a != b  # each key draws a new mask
    # With the dropout off the translation is torch's step without dropout.
    translation._train.random_off = True
    model.rnn.dropout = 0.0
    want = float(loss_of(model, {k: torch.from_numpy(v) for k, v in batch.items()}))
    assert abs(train_losses(translation, batch, [1])[0] - want) <= 1e-5


def test_verify_turns_off_lstm_dropout():
    torch.manual_seed(0)
    model = Recurrent().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = verify(
        model, optimizer, loss_of, [batch_of(s, (4, 5, 4)) for s in range(3)], quiet=True
    )
    assert report.ok and "rnn (dropout)" in report.dropout_off


def test_stochastic_depth_and_literal_dropout_are_translated_with_keys():
    torch.manual_seed(0)
    model = Deep().train()
    translation = translate(model, loss_of, batch_of(0))
    ops = sorted((op, module) for op, _, module in translation._train.random_sites())
    assert ops == [
        ("aten.bernoulli.p", "drop_path"),
        ("aten.native_dropout.default", ""),
        ("aten.rand.default", "block"),
    ]
    a, b = train_losses(translation, batch_of(0), [1, 2])
    assert a != b


def test_verify_turns_off_stochastic_depth_and_literal_dropout_and_lists_them():
    torch.manual_seed(0)
    model = Deep().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    report = verify(model, optimizer, loss_of, [batch_of(s) for s in range(3)], quiet=True)
    assert report.ok
    # Neither has a rate verify knows: both modules run in eval mode in torch and JAX.
    assert sorted(report.eval_modules) == ["block", "drop_path"]
    assert [s.split(" ")[0] for s in report.random_off] == ["aten.native_dropout.default"]
    assert "eval mode in both" in str(report) and "rate 0 in both" in str(report)
    assert model.block.training and model.drop_path.training  # the user's model is untouched


def test_a_random_op_without_a_keyed_translation_is_refused(monkeypatch):
    from mlperf_tutor.migrate.aten_ops import RANDOM_OPS

    monkeypatch.setattr(
        "mlperf_tutor.migrate.interpreter.RANDOM_OPS", RANDOM_OPS - {"aten.rand.default"}
    )
    torch.manual_seed(0)
    with pytest.raises(UnsupportedOp, match=r"aten.rand.default \(it draws random numbers"):
        translate(Deep().train(), loss_of, batch_of(0))


def test_verify_refuses_random_numbers_drawn_outside_the_model():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def noisy(model, batch):
        x = batch["x"] + 0.1 * torch.randn(batch["x"].shape)
        return F.cross_entropy(model(x), batch["y"])

    with pytest.raises(VerificationError, match=r"aten.randn.default .*loss_fn draws them"):
        verify(model, optimizer, noisy, [batch_of(s) for s in range(2)], quiet=True)

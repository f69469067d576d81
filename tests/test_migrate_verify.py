"""verify's float64 referee: round-off-only parameters pass and are named; planted bugs fail.

An attention key bias has a gradient that is zero in exact arithmetic (softmax ignores a shift
shared by all keys of a query). In float32 it is round-off, Adam turns it into lr-sized steps,
and torch and JAX disagree on it by a relative error of order one: the plain bars fail a correct
port. Against torch's float64 run the port is no worse than torch's own float32 run, so the
referee passes it and names the parameter. Translation bugs, planted here by replacing one op's
translation in the interpreter's table, move the port away from float64 while torch stays near
it, and still fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mlperf_tutor.migrate import VerificationError, verify
from mlperf_tutor.migrate.aten_ops import OPS

pytestmark = pytest.mark.requires("torch", "jax", "hf")

STEPS = 3


def bert_classifier():
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).train()


def bert_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 40, (4, 8)), "labels": rng.integers(0, 3, (4,))}


def bert_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def test_referee_passes_bert_key_bias_roundoff_that_the_plain_bars_fail():
    model = bert_classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = [bert_batch(s) for s in range(STEPS)]
    plain = verify(
        model, optimizer, bert_loss, batches, referee=False, quiet=True, raise_on_failure=False
    )
    key_bias = "bert.encoder.layer.0.attention.self.key.bias"
    assert not plain.ok
    assert {f.split(": ")[1].split(" ")[0] for f in plain.failures} == {key_bias}
    judged = verify(model, optimizer, bert_loss, batches, quiet=True)
    assert judged.ok and judged.referee
    assert judged.roundoff == [key_bias]
    assert key_bias in str(judged) and "float64" in str(judged)
    frame = judged.to_dataframe()
    assert list(frame.index) == list(range(STEPS))
    assert {"torch dev", "jax dev", "f64 gap", "ok"} <= set(frame.columns)


class Block(nn.Module):
    """A pre-norm Transformer encoder layer (MultiheadAttention's in_proj_bias holds a key bias)
    with a GELU feed-forward and a linear head. Embeddings start as BERT's (std 0.02), so the
    first LayerNorm sees a variance of 4e-4 and its eps matters; the feed-forward's first weight
    is scaled up so its pre-activations reach |x| ~ 2, where tanh and exact GELU differ most."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.layer = nn.TransformerEncoderLayer(
            16,
            2,
            32,
            dropout=0.1,
            activation="gelu",
            layer_norm_eps=eps,
            batch_first=True,
            norm_first=True,
        )
        self.head = nn.Linear(16, 5)
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.layer.linear1.weight.mul_(4.0)

    def forward(self, tokens):
        x = self.layer(self.embed(tokens))  # (B, T, D)
        return self.head(x.mean(1))


def block_loss(model, batch):
    return nn.functional.cross_entropy(model(batch["tokens"]), batch["label"])


def block_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, 20, (4, 6)), "label": rng.integers(0, 5, (4,))}


def block_case(eps: float = 1e-5):
    torch.manual_seed(0)
    model = Block(eps).train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), block_loss


def test_referee_passes_multihead_attention_in_proj_bias_roundoff():
    model, optimizer, loss_fn = block_case()
    batches = [block_batch(s) for s in range(STEPS)]
    report = verify(model, optimizer, loss_fn, batches, quiet=True)
    assert report.ok
    assert "layer.self_attn.in_proj_bias" in report.roundoff


def _tanh_gelu(monkeypatch):
    exact = OPS["aten.gelu.default"]
    monkeypatch.setitem(OPS, "aten.gelu.default", lambda x, approximate="none": exact(x, "tanh"))


def _default_eps(monkeypatch):
    layer_norm = OPS["aten.native_layer_norm.default"]
    monkeypatch.setitem(
        OPS,
        "aten.native_layer_norm.default",
        lambda x, shape, w, b, eps: layer_norm(x, shape, w, b, 1e-5),
    )


def _dropped_bias(monkeypatch):
    addmm = OPS["aten.addmm.default"]
    monkeypatch.setitem(
        OPS, "aten.addmm.default", lambda bias, a, b, **kw: addmm(0 * bias, a, b, **kw)
    )


@pytest.mark.parametrize(
    "plant, eps",
    [(_tanh_gelu, 1e-5), (_default_eps, 1e-12), (_dropped_bias, 1e-5)],
    ids=["tanh-gelu", "layer-norm-eps", "dropped-bias"],
)
def test_referee_still_fails_a_planted_translation_bug(plant, eps, monkeypatch):
    model, optimizer, loss_fn = block_case(eps)
    batches = [block_batch(s) for s in range(STEPS)]
    plant(monkeypatch)
    with pytest.raises(VerificationError, match="diverged") as failure:
        verify(model, optimizer, loss_fn, batches, quiet=True)
    assert "FAIL" in str(failure.value) and "float64" in str(failure.value)

"""GPT-3 and GPT-J in PyTorch, and the shared layers' rotary positions and parallel block.

Everything is checked against the float64 numpy reference in ``numpy_reference.py``: rotary,
causal attention, the parallel block and the whole decoder (logits and loss).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy_reference as ref
import pytest
import torch
from checks import as_f64, randomized

from mlperf_tutor import frameworks, workloads
from mlperf_tutor.core.parity import OUTPUT_ATOL
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec
from mlperf_tutor.layers.torch.attention import Attention
from mlperf_tutor.layers.torch.block import TransformerBlock
from mlperf_tutor.layers.torch.rotary import apply_rotary
from mlperf_tutor.workloads.gpt import torch_model
from mlperf_tutor.workloads.gpt.data import token_cross_entropy

pytestmark = pytest.mark.requires("torch")

ADAPTER = frameworks.get("torch")
NAMES = ("gpt3", "gptj")
B, T, D, N, F = 2, 7, 16, 4, 24  # odd T: rotary and causal masks at an uneven length
EPS = 1e-5
F64_ATOL = 1e-10

# --- helpers ------------------------------------------------------------------------------


def run(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def assert_close(got, want, atol: float = OUTPUT_ATOL) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err <= atol, f"max-abs {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)


# --- rotary -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize(("t", "base"), [(5, 10000.0), (7, 500.0)])
def test_apply_rotary_matches_numpy_in_float64(layout, t, base):
    heads, h, rotary_dim = 3, 10, 6  # rotary_dim < H: the last 4 dims pass through
    q = np.random.default_rng(t).standard_normal((2, t, heads, h))
    got = apply_rotary(torch.from_numpy(q), rotary_dim, base, layout)
    assert got.dtype == torch.float64
    want = ref.rotary(q, rotary_dim, layout, base)
    assert_close(got.numpy(), want, F64_ATOL)
    assert np.array_equal(got.numpy()[..., rotary_dim:], q[..., rotary_dim:])
    assert np.array_equal(got.numpy()[:, 0], q[:, 0])  # position 0 does not turn


def test_apply_rotary_keeps_dtype_and_layouts_differ():
    q = torch.randn(1, 5, 2, 8, generator=torch.Generator().manual_seed(0))
    inter, half = apply_rotary(q, 8), apply_rotary(q, 8, layout="half")
    assert inter.dtype == torch.float32 and apply_rotary(q.bfloat16(), 8).dtype == torch.bfloat16
    assert not torch.allclose(inter, half)
    # A rotation keeps each pair's length: the per-position norm is unchanged.
    torch.testing.assert_close(inter.norm(dim=-1), q.norm(dim=-1))


def test_bad_rotary_arguments_are_refused():
    with pytest.raises(ValueError, match="rotary_layout must be one of"):
        AttentionSpec(D, N, rotary_dim=2, rotary_layout="neox")
    with pytest.raises(ValueError, match=r"rotary_dim \(5\) must be even"):
        AttentionSpec(D, N, rotary_dim=5)
    with pytest.raises(ValueError, match=r"rotary_dim \(6\) must be even and in \[0, head dim 4\]"):
        AttentionSpec(D, N, rotary_dim=6)
    with pytest.raises(ValueError, match="rotary_layout must be one of"):
        apply_rotary(torch.zeros(1, 2, 1, 4), 2, layout="neox")


# --- causal rotary attention ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rotary_dim", "layout", "num_kv_heads"),
    [(2, "interleaved", None), (4, "interleaved", 2), (4, "half", None), (2, "half", 1)],
)
def test_causal_rotary_attention_matches_numpy(x, rotary_dim, layout, num_kv_heads):
    spec = AttentionSpec(
        D, N, num_kv_heads=num_kv_heads, causal=True, rotary_dim=rotary_dim, rotary_layout=layout
    )
    layer = Attention(spec)
    w = as_f64(randomized(layer, seed=1))
    want = ref.attention(
        w,
        x.astype(np.float64),
        N,
        num_kv_heads,
        causal=True,
        rotary_dim=rotary_dim,
        rotary_layout=layout,
    )
    assert_close(run(layer, x), want)
    assert_close(run(layer.double(), x.astype(np.float64)), want, F64_ATOL)


@pytest.mark.parametrize("fused", [False, True])
def test_future_tokens_do_not_change_earlier_outputs(x, fused):
    layer = Attention(AttentionSpec(D, N, causal=True, rotary_dim=2, fused=fused))
    randomized(layer, seed=2)
    noisy = x.copy()
    noisy[:, -1] += 100.0  # only the last token changes
    a, b = run(layer, x), run(layer, noisy)
    assert np.array_equal(a[:, :-1], b[:, :-1])
    assert not np.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_fused_causal_rotary_attention_matches_explicit(x, num_kv_heads):
    spec = AttentionSpec(D, N, num_kv_heads=num_kv_heads, causal=True, rotary_dim=4)
    explicit, fused = Attention(spec), Attention(dataclasses.replace(spec, fused=True))
    ADAPTER.load_canonical(fused.eval(), randomized(explicit, seed=3))
    assert_close(run(fused, x), run(explicit, x))


# --- parallel block -----------------------------------------------------------------------


def test_parallel_block_matches_numpy_and_has_one_norm(x):
    spec = BlockSpec(
        AttentionSpec(D, N, bias=False, causal=True, rotary_dim=2),
        MlpSpec(D, F, activation="gelu_tanh", bias=True),
        norm_eps=EPS,
        norm_position="parallel",
    )
    layer = TransformerBlock(spec)
    assert not hasattr(layer, "mlp_norm")
    names = set(layer.state_dict())
    assert "mlp.fc_in.bias" in names and not any("attention.q_proj.bias" in k for k in names)
    assert not any(k.startswith("mlp_norm") for k in names)
    w = as_f64(randomized(layer, seed=4))
    want = ref.block(
        w,
        x.astype(np.float64),
        N,
        EPS,
        "parallel",
        causal=True,
        activation="gelu_tanh",
        rotary_dim=2,
    )
    assert_close(run(layer, x), want)
    assert_close(run(layer.double(), x.astype(np.float64)), want, F64_ATOL)


def test_attention_and_mlp_biases_follow_their_specs():
    block = TransformerBlock(
        BlockSpec(AttentionSpec(D, N, bias=False), MlpSpec(D, F, bias=False), norm_eps=EPS)
    )
    assert block.attention.q_proj.bias is None and block.mlp.fc_in.bias is None
    assert block.attention.o_proj.bias is None  # out_bias None: as the other projections
    block = TransformerBlock(
        BlockSpec(AttentionSpec(D, N, bias=False), MlpSpec(D, F, bias=True), norm_eps=EPS)
    )
    assert block.attention.o_proj.bias is None and block.mlp.fc_out.bias is not None


# --- the decoders -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=NAMES)
def setup(request):
    """(workload, tiny config, random canonical tree, batch of odd length with ignored labels)."""
    wl = workloads.get(request.param)
    cfg = wl.config("tiny")
    rng = np.random.default_rng(5)
    tree = {}
    for name, value in wl.init_canonical(cfg, seed=6).items():
        if "norm" in name and name.endswith("weight"):
            value = value + 0.2 * rng.standard_normal(value.shape)
        elif value.ndim == 1:  # biases
            value = value + 0.2 * rng.standard_normal(value.shape)
        else:  # std 0.2: attention far from uniform, so rotary and the mask matter
            value = value * 10.0
        tree[name] = value.astype(np.float32)
    batch = {k: v[:, :T] for k, v in wl.synthetic_batch(cfg, batch_size=3, seed=7).items()}
    batch["labels"][0, :3] = -100
    batch["labels"][2, -1] = -100
    return wl, cfg, tree, batch


def test_float64_decoder_matches_numpy_reference(setup):
    wl, cfg, tree, batch = setup
    model = wl.build("torch", cfg, weights=tree).double()
    w = as_f64(tree)
    ADAPTER.load_canonical(model, w)
    want = ref.gpt(w, cfg, batch["input_ids"], batch["labels"])
    out = ADAPTER.forward(model, batch)
    assert out["logits"].dtype == np.float64 and out["loss"].dtype == np.float64
    assert_close(out["logits"], want["logits"], F64_ATOL)
    assert_close(out["loss"], want["loss"], F64_ATOL)


def test_float32_decoder_matches_numpy_reference(setup):
    wl, cfg, tree, batch = setup
    out = wl.forward("torch", wl.build("torch", cfg, weights=tree), batch)
    want = ref.gpt(as_f64(tree), cfg, batch["input_ids"], batch["labels"])
    assert out["logits"].shape == (3, T, cfg.padded_vocab_size)
    assert_close(out["logits"], want["logits"])
    assert_close(out["loss"], want["loss"])


def test_ignored_labels_do_not_count_and_no_labels_gives_logits_only(setup):
    wl, cfg, tree, batch = setup
    model = wl.build("torch", cfg, weights=tree)
    out = wl.forward("torch", model, batch)
    # The mean over the labelled tokens, not over all of B x T.
    logits = ref.gpt(as_f64(tree), cfg, batch["input_ids"])["logits"]
    total, count = token_cross_entropy(logits, batch["labels"])
    assert count == batch["labels"].size - 4
    assert_close(out["loss"], total / count)
    everything = token_cross_entropy(logits, np.where(batch["labels"] < 0, 0, batch["labels"]))
    assert abs(everything[0] / everything[1] - total / count) > 1e-3
    logits_only = wl.forward("torch", model, {"input_ids": batch["input_ids"]})
    assert set(logits_only) == {"logits"}
    assert np.array_equal(logits_only["logits"], out["logits"])


def test_fused_decoder_matches_explicit(setup):
    wl, cfg, tree, batch = setup
    fused = torch_model.build(cfg, fused=True)
    ADAPTER.load_canonical(fused, tree)
    assert all(block.attention.spec.fused for block in fused.blocks)
    ours = wl.forward("torch", wl.build("torch", cfg, weights=tree), batch)
    theirs = wl.forward("torch", fused, batch)
    for key in ("logits", "loss"):
        assert_close(theirs[key], ours[key])


def test_head_and_position_table_follow_the_config(setup):
    wl, cfg, tree, _ = setup
    model = wl.build("torch", cfg, weights=tree)
    assert (model.lm_head is None) == cfg.tie_embeddings
    assert (model.embeddings.position_embeddings is None) == (cfg.position == "rotary")


def test_training_with_dropout_gives_a_finite_different_loss(setup):
    wl, cfg, tree, batch = setup
    model = wl.build("torch", cfg.replace(dropout=0.1), weights=tree)
    torch.manual_seed(0)
    eval_loss = float(wl.forward("torch", model, batch)["loss"])
    train_losses = [float(wl.forward("torch", model, batch, train=True)["loss"]) for _ in range(2)]
    assert np.isfinite([eval_loss, *train_losses]).all()
    assert eval_loss not in train_losses and train_losses[0] != train_losses[1]

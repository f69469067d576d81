"""BERT in JAX (Flax NNX): canonical names, the shared transformer blocks against the float64 numpy
reference (``numpy_reference.py``), the forward against transformers' BertForPreTraining, dropout
and LAMB training."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy_reference as ref
import pytest

pytestmark = pytest.mark.requires("jax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mlperf_tutor import frameworks, workloads  # noqa: E402
from mlperf_tutor.core.parity import OUTPUT_ATOL  # noqa: E402
from mlperf_tutor.layers.jax.attention import Attention  # noqa: E402
from mlperf_tutor.layers.jax.block import TransformerBlock  # noqa: E402
from mlperf_tutor.layers.jax.mlp import MLP, get_activation  # noqa: E402
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec  # noqa: E402
from mlperf_tutor.workloads.bert import jax_model as bert_jax  # noqa: E402

fj = frameworks.get("jax")
WL = workloads.get("bert")
CFG = WL.config("tiny")  # dropout 0.1, as the reference trains
DET = WL.deterministic(CFG)  # dropout 0.0
B, T, D, N, F = 3, 7, 16, 4, 24


@pytest.fixture(scope="module", autouse=True)
def _pinned():
    fj.pin_precision()


# --- helpers ----------------------------------------------------------------------------------
def randomise(module: nnx.Module, seed: int) -> dict[str, np.ndarray]:
    """Load random weights (norm scales near 1, everything else random, biases included) into
    ``module``; return them in float64 for the numpy reference."""
    rng = np.random.default_rng(seed)
    tree = {}
    for name, value in fj.to_canonical(module).items():
        if "norm." in name and name.endswith("weight"):
            tree[name] = 1.0 + 0.1 * rng.standard_normal(value.shape)
        else:
            tree[name] = 0.3 * rng.standard_normal(value.shape)
    fj.load_canonical(module, {k: v.astype(np.float32) for k, v in tree.items()})
    return {k: v.astype(np.float32).astype(np.float64) for k, v in tree.items()}


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x (B, T, D) and a key mask (B, T) whose rows have 7, 4 and 1 real tokens."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    mask = (np.arange(T)[None] < np.array([[T], [4], [1]])).astype(np.int32)
    return x, mask


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@nnx.jit
def _apply(module, x, mask):
    return module(x, mask)


# --- the shared blocks ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "num_kv_heads, causal, masked",
    [
        (None, False, True),
        (None, True, False),
        (None, True, True),
        (2, False, True),
        (1, True, True),
    ],
    ids=["key_mask", "causal", "causal_key_mask", "gqa_key_mask", "mqa_causal_key_mask"],
)
def test_attention_matches_numpy(num_kv_heads, causal, masked):
    spec = AttentionSpec(D, N, num_kv_heads=num_kv_heads, causal=causal)
    attention = Attention(spec, rngs=nnx.Rngs(0))
    w = randomise(attention, seed=1)
    if num_kv_heads:
        assert w["k_proj.weight"].shape == (num_kv_heads * D // N, D)
    x, mask = inputs()
    mask = mask if masked else None
    got = _apply(attention, jnp.asarray(x), None if mask is None else jnp.asarray(mask))
    want = ref.attention(w, x.astype(np.float64), N, num_kv_heads, key_mask=mask, causal=causal)
    assert got.shape == (B, T, D)
    assert max_abs(got, want) <= OUTPUT_ATOL


def test_attention_without_bias_has_no_bias_leaves():
    attention = Attention(AttentionSpec(D, N, num_kv_heads=2, bias=False), rngs=nnx.Rngs(0))
    assert sorted(fj.to_canonical(attention)) == [
        f"{p}.weight" for p in ("k_proj", "o_proj", "q_proj", "v_proj")
    ]


@pytest.mark.parametrize("num_kv_heads, causal", [(None, False), (2, True)])
def test_fused_attention_matches_explicit(num_kv_heads, causal):
    spec = AttentionSpec(D, N, num_kv_heads=num_kv_heads, causal=causal)
    explicit = Attention(spec, rngs=nnx.Rngs(0))
    fused = Attention(dataclasses.replace(spec, fused=True), rngs=nnx.Rngs(1))
    fj.load_canonical(fused, fj.to_canonical(explicit))
    x, mask = map(jnp.asarray, inputs(seed=2))
    assert max_abs(_apply(fused, x, mask), _apply(explicit, x, mask)) <= OUTPUT_ATOL


def test_fused_attention_refuses_dropout():
    with pytest.raises(ValueError, match="dropout"):
        Attention(AttentionSpec(D, N, dropout=0.1, fused=True), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_mlp_activations_match_numpy(activation):
    mlp = MLP(MlpSpec(D, F, activation=activation), rngs=nnx.Rngs(0))
    w = randomise(mlp, seed=3)
    x, _ = inputs(seed=3)
    got = nnx.jit(lambda m, x: m(x))(mlp, jnp.asarray(x))
    want = ref.mlp(w, x.astype(np.float64), activation)
    assert max_abs(got, want) <= OUTPUT_ATOL


def test_gelu_is_exact_not_tanh():
    x = jnp.linspace(-4.0, 4.0, 101)
    exact, approx = get_activation("gelu")(x), get_activation("gelu_tanh")(x)
    assert max_abs(exact, ref.ACTIVATIONS["gelu"](np.asarray(x, np.float64))) < 1e-6
    assert max_abs(exact, approx) > 1e-4


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="gelu_tanh"):
        get_activation("swish")
    with pytest.raises(ValueError, match="gelu_tanh"):
        MlpSpec(D, F, activation="swish")
    with pytest.raises(ValueError, match="post"):
        BlockSpec(AttentionSpec(D, N), MlpSpec(D, F), norm_eps=1e-5, norm_position="middle")


def block_spec(eps: float = 1e-5, causal: bool = False, **block) -> BlockSpec:
    """A BERT-like block over D with N heads and an exact-GELU MLP of width F."""
    return BlockSpec(AttentionSpec(D, N, causal=causal), MlpSpec(D, F), norm_eps=eps, **block)


@pytest.mark.parametrize("norm_position, causal", [("post", False), ("pre", True)])
def test_transformer_block_matches_numpy(norm_position, causal):
    eps = 1e-5
    spec = block_spec(eps, causal, norm_position=norm_position)
    block = TransformerBlock(spec, rngs=nnx.Rngs(0))
    w = randomise(block, seed=4)
    assert {k.split(".")[0] for k in w} == {"attention", "attention_norm", "mlp", "mlp_norm"}
    x, mask = inputs(seed=4)
    got = _apply(block, jnp.asarray(x), jnp.asarray(mask))
    want = ref.block(w, x.astype(np.float64), N, eps, norm_position, mask, causal)
    assert max_abs(got, want) <= OUTPUT_ATOL


@pytest.mark.parametrize("which", ["dropout", "attention_dropout"])
def test_block_dropout_is_random_in_train_mode_and_off_in_eval(which):
    spec = block_spec()
    if which == "dropout":
        spec = dataclasses.replace(spec, dropout=0.3)
    else:
        spec = dataclasses.replace(spec, attention=AttentionSpec(D, N, dropout=0.3))
    block = TransformerBlock(spec, rngs=nnx.Rngs(0))
    w = randomise(block, seed=5)
    x, mask = inputs(seed=5)
    args = jnp.asarray(x), jnp.asarray(mask)
    first, second = _apply(block, *args), _apply(block, *args)  # the rng stream advances
    assert np.isfinite(first).all() and max_abs(first, second) > 1e-3
    block.eval()
    want = ref.block(w, x.astype(np.float64), N, 1e-5, "post", mask)
    assert max_abs(_apply(block, *args), want) <= OUTPUT_ATOL


# --- BERT -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch():
    return WL.synthetic_batch(DET, batch_size=4, seed=1)


def hf_model(cfg):
    """transformers' BertForPreTraining of ``cfg``'s sizes, every weight random (seeded)."""
    import torch
    import transformers

    config = transformers.BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn,
        max_position_embeddings=cfg.max_positions,
        type_vocab_size=cfg.type_vocab_size,
        hidden_act="gelu",
        layer_norm_eps=cfg.norm_eps,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model = transformers.BertForPreTraining(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # tied tensors (decoder = word embeddings) stay tied
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.requires("torch", "hf")
def test_forward_matches_transformers(batch):
    import torch

    from mlperf_tutor.workloads.bert.hf import from_hf

    hf = hf_model(DET)
    tree = from_hf({k: v.numpy() for k, v in hf.state_dict().items()})
    ours = WL.forward("jax", WL.build("jax", DET, weights=tree), batch)
    with torch.no_grad():
        out = hf(
            input_ids=torch.as_tensor(batch["input_ids"]).long(),
            token_type_ids=torch.as_tensor(batch["segment_ids"]).long(),
            attention_mask=torch.as_tensor(batch["input_mask"]).long(),
        )
    positions = batch["masked_lm_positions"]
    mlm = np.take_along_axis(out.prediction_logits.numpy(), positions[..., None], axis=1)
    nsp = out.seq_relationship_logits.numpy()
    assert ours["mlm_logits"].shape == mlm.shape and ours["nsp_logits"].shape == nsp.shape
    assert max_abs(ours["mlm_logits"], mlm) <= OUTPUT_ATOL
    assert max_abs(ours["nsp_logits"], nsp) <= OUTPUT_ATOL

    # The loss from HF's logits, as the reference computes it (float64).
    def ce(logits, labels):
        logits = logits.astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
        return logz - np.take_along_axis(logits, labels[..., None], -1)[..., 0]

    w = (positions != 0).astype(np.float64)
    loss = (ce(mlm, batch["masked_lm_ids"]) * w).sum() / (w.sum() + 1e-5)
    loss += ce(nsp, batch["next_sentence_labels"]).mean()
    assert max_abs(ours["loss"], loss) <= OUTPUT_ATOL


def test_fused_forward_matches_explicit(batch):
    tree = WL.init_canonical(DET, seed=3)
    fused = bert_jax.build(DET, fused=True)
    fj.load_canonical(fused, tree)
    explicit = WL.forward("jax", WL.build("jax", DET, weights=tree), batch)
    got = fj.forward(fused, batch)
    for key in ("mlm_logits", "nsp_logits", "loss"):
        assert max_abs(got[key], explicit[key]) <= OUTPUT_ATOL, key


@pytest.fixture(scope="module")
def trained(batch):
    """A model with dropout 0.1: its eval loss twice, then 30 LAMB steps on one batch.

    LAMB's steps are ~lr relative to each weight's norm: the tiny preset's 1e-3 moves the loss
    by 3% in 30 steps (5.29 -> 5.13), 2e-2 by a third. One compiled step serves both tests.
    """
    cfg = CFG.replace(lr=2e-2)
    model = WL.build("jax", cfg)
    evals = [WL.forward("jax", model, batch, train=False)["loss"] for _ in range(2)]
    optimizer = fj.make_optimizer(*WL.optimizer(cfg), model)
    steps = [fj.train_step(model, optimizer, batch) for _ in range(30)]
    return {"eval": evals, "steps": steps, "trace_count": optimizer.trace_count}


def test_dropout_is_random_in_train_mode_and_off_in_eval(trained):
    evals, steps = trained["eval"], trained["steps"]
    assert evals[0] == evals[1]
    # The warm-up's rate is 0 at step 0, so steps 0 and 1 see the same weights: their losses
    # differ only through new dropout masks (the jitted step advances the rng streams).
    assert np.isfinite(steps).all() and steps[0] != evals[0] and steps[0] != steps[1]


def test_lamb_with_dropout_reduces_the_loss_on_a_fixed_batch(trained):
    losses = trained["steps"]
    assert np.isfinite(losses).all() and trained["trace_count"] == 1
    assert losses[-1] < 0.8 * losses[0]
    assert np.mean(losses[-5:]) < np.mean(losses[10:15]) < np.mean(losses[:5])

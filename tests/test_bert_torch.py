"""BERT in PyTorch and the shared PyTorch transformer blocks.

The blocks are checked against the float64 numpy reference in ``numpy_reference.py``; the BERT
forward against Hugging Face's ``BertForPreTraining`` built locally from a config (no downloads).
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
from mlperf_tutor.layers.torch.mlp import MLP, get_activation
from mlperf_tutor.workloads.bert.hf import from_hf

pytestmark = pytest.mark.requires("torch")

ADAPTER = frameworks.get("torch")
WL = workloads.get("bert")
CFG = WL.config("tiny")
DET = WL.deterministic(CFG)  # dropout 0
B, T, D, N, F = 3, 7, 16, 4, 24
EPS = 1e-6

# --- helpers ------------------------------------------------------------------------------


def run(module, x, *args) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x), *args).numpy()


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)


@pytest.fixture(scope="module")
def key_mask():
    mask = np.ones((B, T), np.int32)
    mask[1, 4:] = 0  # padded tail
    mask[2, 1:] = 0  # one real token
    return mask


def assert_close(got: np.ndarray, want: np.ndarray, atol: float = OUTPUT_ATOL) -> None:
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err <= atol, f"max-abs {err:.3g} > {atol}"


# --- shared blocks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("masked", "causal", "num_kv_heads"),
    [
        (True, False, None),
        (False, True, None),
        (True, True, None),
        (True, True, 2),
        (False, False, 1),
    ],
)
def test_attention_matches_numpy(x, key_mask, masked, causal, num_kv_heads):
    layer = Attention(AttentionSpec(D, N, num_kv_heads=num_kv_heads, causal=causal))
    w = as_f64(randomized(layer, seed=1))
    mask = key_mask if masked else None
    got = run(layer, x, None if mask is None else torch.from_numpy(mask))
    want = ref.attention(w, x.astype(np.float64), N, num_kv_heads, key_mask=mask, causal=causal)
    assert_close(got, want)


def test_grouped_query_attention_has_narrow_key_value_projections():
    layer = Attention(AttentionSpec(D, N, num_kv_heads=2, bias=False))
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "q_proj.weight": (D, D),
        "k_proj.weight": (2 * D // N, D),
        "v_proj.weight": (2 * D // N, D),
        "o_proj.weight": (D, D),
    }


def test_padded_keys_do_not_influence_real_queries(x, key_mask):
    layer = Attention(AttentionSpec(D, N))
    randomized(layer, seed=2)
    noisy = x.copy()
    noisy[1, 4:] += 100.0  # change only the padded tokens of example 1
    mask = torch.from_numpy(key_mask)
    a, b = run(layer, x, mask), run(layer, noisy, mask)
    assert_close(a[1, :4], b[1, :4])


@pytest.mark.parametrize(
    ("masked", "causal", "num_kv_heads"), [(True, False, None), (True, True, 2)]
)
def test_fused_attention_matches_explicit(x, key_mask, masked, causal, num_kv_heads):
    spec = AttentionSpec(D, N, num_kv_heads=num_kv_heads, causal=causal)
    explicit, fused = Attention(spec), Attention(dataclasses.replace(spec, fused=True))
    tree = randomized(explicit, seed=3)
    ADAPTER.load_canonical(fused.eval(), tree)
    mask = torch.from_numpy(key_mask) if masked else None
    assert_close(run(fused, x, mask), run(explicit, x, mask))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
def test_mlp_matches_numpy(x, act):
    layer = MLP(MlpSpec(D, F, activation=act))
    w = as_f64(randomized(layer, seed=4))
    assert_close(run(layer, x), ref.mlp(w, x.astype(np.float64), act))


def test_gelu_is_exact_and_unknown_activation_is_refused():
    # exact and tanh GELU differ by ~1e-4 near |x| = 2: the approximation must be the named one.
    z = torch.tensor([2.0], dtype=torch.float64)
    assert abs(float(get_activation("gelu")(z)) - ref.ACTIVATIONS["gelu"](2.0)) < 1e-12
    assert abs(float(get_activation("gelu")(z) - get_activation("gelu_tanh")(z))) > 1e-5
    with pytest.raises(ValueError, match="unknown activation 'swish'.*gelu_tanh"):
        MlpSpec(D, F, activation="swish")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        get_activation("swish")


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_transformer_block_matches_numpy(x, key_mask, norm_position):
    spec = BlockSpec(AttentionSpec(D, N), MlpSpec(D, F), norm_eps=EPS, norm_position=norm_position)
    layer = TransformerBlock(spec)
    w = as_f64(randomized(layer, seed=5))
    got = run(layer, x, torch.from_numpy(key_mask))
    assert_close(got, ref.block(w, x.astype(np.float64), N, EPS, norm_position, key_mask=key_mask))


def test_transformer_block_refuses_unknown_norm_position():
    with pytest.raises(ValueError, match="norm_position must be 'post' or 'pre'"):
        BlockSpec(AttentionSpec(D, N), MlpSpec(D, F), norm_eps=EPS, norm_position="sandwich")


# --- BERT ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_outputs():
    """HF BertForPreTraining with random weights (norms and biases too), its canonical tree,
    a batch with padding, and HF's logits on it."""
    import transformers

    hf_cfg = transformers.BertConfig(
        vocab_size=CFG.vocab_size,
        hidden_size=CFG.hidden,
        num_hidden_layers=CFG.num_layers,
        num_attention_heads=CFG.num_heads,
        intermediate_size=CFG.ffn,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=CFG.max_positions,
        type_vocab_size=CFG.type_vocab_size,
        layer_norm_eps=CFG.norm_eps,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(hf_cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():  # tied weights appear once, so they stay tied
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(
                noise * (0.1 if p.ndim == 1 else 0.05)
                + (1.0 if "LayerNorm.weight" in name else 0.0)
            )
    tree = from_hf({k: v.numpy() for k, v in hf.state_dict().items()})
    batch = WL.synthetic_batch(DET, batch_size=4, seed=1)
    assert (batch["input_mask"] == 0).any() and (batch["masked_lm_positions"] == 0).any()
    with torch.no_grad():
        out = hf(
            input_ids=torch.from_numpy(batch["input_ids"]).long(),
            token_type_ids=torch.from_numpy(batch["segment_ids"]).long(),
            attention_mask=torch.from_numpy(batch["input_mask"]).long(),
        )
    return tree, batch, out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()


@pytest.mark.requires("hf")
def test_forward_matches_transformers_bert_for_pretraining(hf_outputs):
    tree, batch, prediction_logits, nsp_logits = hf_outputs
    ours = WL.forward("torch", WL.build("torch", DET, weights=tree), batch)
    positions = batch["masked_lm_positions"]
    want = np.take_along_axis(prediction_logits, positions[:, :, None], axis=1)  # (B, P, V)
    assert_close(ours["mlm_logits"], want)
    assert_close(ours["nsp_logits"], nsp_logits)

    # The loss from HF's logits, in float64, with the reference's formula.
    def ce(logits, labels):
        logits = logits.astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        return logz - np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]

    w = (positions != 0).astype(np.float64)
    mlm = (ce(want, batch["masked_lm_ids"]) * w).sum() / (w.sum() + 1e-5)
    assert_close(
        ours["loss"], np.asarray(mlm + ce(nsp_logits, batch["next_sentence_labels"]).mean())
    )


@pytest.mark.requires("hf")
def test_fused_attention_path_gives_the_same_bert_outputs(hf_outputs):
    from mlperf_tutor.workloads.bert import torch_model

    tree, batch, _, _ = hf_outputs
    fused = torch_model.build(DET, fused=True)
    ADAPTER.load_canonical(fused, tree)
    ours = WL.forward("torch", WL.build("torch", DET, weights=tree), batch)
    theirs = WL.forward("torch", fused, batch)
    for key in ("mlm_logits", "nsp_logits", "loss"):
        assert_close(theirs[key], ours[key])


def test_training_with_dropout_gives_a_finite_different_loss():
    assert CFG.dropout == 0.1
    model = WL.build("torch", CFG)
    batch = WL.synthetic_batch(CFG, batch_size=4, seed=2)
    torch.manual_seed(0)
    eval_loss = float(WL.forward("torch", model, batch, train=False)["loss"])
    train_losses = [float(WL.forward("torch", model, batch, train=True)["loss"]) for _ in range(2)]
    assert np.isfinite([eval_loss, *train_losses]).all()
    assert eval_loss not in train_losses and train_losses[0] != train_losses[1]
    spec, schedule = WL.optimizer(CFG)
    optimizer = ADAPTER.make_optimizer(spec, schedule, model)
    assert np.isfinite(ADAPTER.train_step(model, optimizer, batch))
    assert all(np.isfinite(v).all() for v in WL.export("torch", model).values())


def test_lamb_train_step_reduces_the_loss_on_a_fixed_batch():
    # LAMB moves each weight by about lr * |w| per step; with the preset's 1e-3 thirty steps
    # lower the loss by only 3%, so a larger rate makes the test discriminate.
    cfg = DET.replace(lr=1e-2)
    model = WL.build("torch", cfg)
    spec, schedule = WL.optimizer(cfg)
    optimizer = ADAPTER.make_optimizer(spec, schedule, model)
    batch = WL.synthetic_batch(cfg, batch_size=4, seed=3)
    losses = [ADAPTER.train_step(model, optimizer, batch) for _ in range(30)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.85 * losses[0] and (np.diff(losses[1:]) < 0).all(), losses


def test_float64_model_stays_float64_through_attention_and_losses():
    # Gradient checks run models in float64; no float32 detour may cap their precision.
    model = WL.build("torch", DET).double()
    out = model({k: torch.from_numpy(v) for k, v in WL.synthetic_batch(DET, 2).items()})
    assert {v.dtype for v in out.values()} == {torch.float64}

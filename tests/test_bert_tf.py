"""BERT in TensorFlow (Keras 3): canonical names, the shared transformer blocks against the float64
numpy reference (``numpy_reference.py``), the forward against transformers' BertForPreTraining,
dropout and LAMB."""

from __future__ import annotations

import numpy as np
import numpy_reference as ref
import pytest

pytestmark = pytest.mark.requires("tf")

from mlperf_tutor import workloads  # noqa: E402
from mlperf_tutor.core.parity import OUTPUT_ATOL  # noqa: E402
from mlperf_tutor.frameworks import tf as adapter  # noqa: E402
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec  # noqa: E402
from mlperf_tutor.layers.tf.attention import Attention  # noqa: E402
from mlperf_tutor.layers.tf.block import TransformerBlock  # noqa: E402
from mlperf_tutor.layers.tf.mlp import MLP  # noqa: E402
from mlperf_tutor.workloads.bert import tf_model  # noqa: E402

WL = workloads.get("bert")
CFG = WL.config("tiny")
B, T, D, N, F = 3, 7, 16, 4, 24  # the blocks' test sizes


# --- helpers ------------------------------------------------------------------------------------
def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    lengths = np.array([T, 4, 1])  # full, padded, a single real token
    key_mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    return x, key_mask


def load_random(layer, x, seed=0, **call_kwargs) -> dict[str, np.ndarray]:
    """Build ``layer`` on ``x``, load random canonical weights, return them (float64)."""
    layer(x, **call_kwargs)
    rng = np.random.default_rng(seed)
    tree = {}
    for leaf in adapter.leaves(layer):
        shape, _ = leaf.spec
        if "norm." in leaf.name and leaf.name.endswith("weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # std 0.3: attention far from uniform, outputs O(10) (float32 round-off ~1e-6)
            value = 0.3 * rng.standard_normal(shape)
        tree[leaf.name] = value.astype(np.float32)
    adapter.load_canonical(layer, tree)
    return {k: v.astype(np.float64) for k, v in tree.items()}


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max())


# --- canonical names ----------------------------------------------------------------------------
def test_blocks_are_layers_named_by_their_canonical_path():
    model = tf_model.build(CFG)
    assert len(model.blocks) == CFG.num_layers
    assert model.blocks[1].attention.q_proj.kernel.path.endswith("blocks.1/attention/q_proj/kernel")


# --- shared blocks against numpy ----------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "fused"])
@pytest.mark.parametrize("causal", [False, True], ids=["key_mask", "causal"])
def test_attention_matches_numpy(causal, fused):
    x, key_mask = inputs()
    layer = Attention(AttentionSpec(D, N, causal=causal, fused=fused))
    tree = load_random(layer, x, key_mask=key_mask)
    want = ref.attention(tree, x.astype(np.float64), N, key_mask=key_mask, causal=causal)
    got = adapter.to_numpy(layer(x, key_mask))
    assert max_abs(got, want) <= OUTPUT_ATOL


@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "fused"])
def test_grouped_query_attention_without_bias_matches_numpy(fused):
    x, key_mask = inputs(1)
    layer = Attention(AttentionSpec(D, N, num_kv_heads=2, bias=False, causal=True, fused=fused))
    tree = load_random(layer, x, seed=1, key_mask=key_mask)
    assert tree["k_proj.weight"].shape == (2 * D // N, D) and "q_proj.bias" not in tree
    want = ref.attention(tree, x.astype(np.float64), N, 2, key_mask=key_mask, causal=True)
    assert max_abs(adapter.to_numpy(layer(x, key_mask)), want) <= OUTPUT_ATOL


def test_fused_attention_refuses_dropout():
    with pytest.raises(ValueError, match="no attention-probability dropout"):
        Attention(AttentionSpec(D, N, dropout=0.1, fused=True))


@pytest.mark.parametrize("activation", list(ref.ACTIVATIONS))
def test_mlp_matches_numpy(activation):
    x, _ = inputs(2)
    layer = MLP(MlpSpec(D, F, activation=activation))
    tree = load_random(layer, x, seed=2)
    want = ref.mlp(tree, x.astype(np.float64), activation)
    assert max_abs(adapter.to_numpy(layer(x)), want) <= OUTPUT_ATOL


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'gelu_exact'"):
        MLP(MlpSpec(D, F, activation="gelu_exact"))


@pytest.mark.parametrize("position", ["post", "pre"])
def test_transformer_block_matches_numpy(position):
    x, key_mask = inputs(3)
    spec = BlockSpec(AttentionSpec(D, N), MlpSpec(D, F), norm_eps=1e-12, norm_position=position)
    layer = TransformerBlock(spec)
    tree = load_random(layer, x, seed=3, key_mask=key_mask)
    want = ref.block(tree, x.astype(np.float64), N, 1e-12, position, key_mask=key_mask)
    assert max_abs(adapter.to_numpy(layer(x, key_mask)), want) <= OUTPUT_ATOL


def test_causal_pre_ln_block_matches_numpy():
    x, _ = inputs(4)
    spec = BlockSpec(
        AttentionSpec(D, N, causal=True), MlpSpec(D, F), norm_eps=1e-5, norm_position="pre"
    )
    layer = TransformerBlock(spec)
    tree = load_random(layer, x, seed=4)
    want = ref.block(tree, x.astype(np.float64), N, 1e-5, "pre", causal=True)
    assert max_abs(adapter.to_numpy(layer(x)), want) <= OUTPUT_ATOL


# --- BERT against transformers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_run():
    """HF BertForPreTraining with random weights, its outputs, and our canonical copy of them."""
    import torch
    import transformers

    from mlperf_tutor.workloads.bert.hf import from_hf

    hf_cfg = transformers.BertConfig(
        vocab_size=CFG.vocab_size,
        hidden_size=CFG.hidden,
        num_hidden_layers=CFG.num_layers,
        num_attention_heads=CFG.num_heads,
        intermediate_size=CFG.ffn,
        max_position_embeddings=CFG.max_positions,
        type_vocab_size=CFG.type_vocab_size,
        hidden_act="gelu",
        layer_norm_eps=CFG.norm_eps,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(hf_cfg).eval()
    with torch.no_grad():  # random biases and norm weights too, so a layout slip shows
        for name, p in hf.named_parameters():
            scale = 0.1 if p.ndim == 1 else 0.2
            p.copy_((1.0 if "LayerNorm.weight" in name else 0.0) + scale * torch.randn_like(p))
    batch = WL.synthetic_batch(CFG, batch_size=4, seed=5)
    with torch.no_grad():
        out = hf(
            input_ids=torch.from_numpy(batch["input_ids"]).long(),
            token_type_ids=torch.from_numpy(batch["segment_ids"]).long(),
            attention_mask=torch.from_numpy(batch["input_mask"]).long(),
        )
    tree = from_hf({k: v.numpy() for k, v in hf.state_dict().items()})
    mlm = out.prediction_logits.numpy()
    positions = batch["masked_lm_positions"]
    mlm = np.take_along_axis(mlm, positions[:, :, None], axis=1)  # (B, P, V)
    return tree, batch, mlm, out.seq_relationship_logits.numpy()


@pytest.fixture(scope="module")
def tf_out(hf_run):
    tree, batch, _, _ = hf_run
    return WL.forward("tf", WL.build("tf", CFG, weights=tree), batch)


@pytest.mark.requires("torch", "hf")
def test_mlm_and_nsp_logits_match_transformers(hf_run, tf_out):
    _, batch, mlm, nsp = hf_run
    assert tf_out["mlm_logits"].shape == (4, CFG.max_predictions, CFG.vocab_size)
    assert max_abs(tf_out["mlm_logits"], mlm) <= OUTPUT_ATOL
    assert max_abs(tf_out["nsp_logits"], nsp) <= OUTPUT_ATOL


@pytest.mark.requires("torch", "hf")
def test_loss_is_masked_mlm_mean_plus_nsp_mean(hf_run, tf_out):
    _, batch, mlm, nsp = hf_run

    def ce(logits, labels):
        logits = logits.astype(np.float64)
        m = logits.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
        return lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]

    w = (batch["masked_lm_positions"] != 0).astype(np.float64)
    assert 0 < w.sum() < w.size  # some padded predictions, so the weighting is exercised
    mlm_loss = (ce(mlm, batch["masked_lm_ids"]) * w).sum() / (w.sum() + 1e-5)
    want = mlm_loss + ce(nsp, batch["next_sentence_labels"]).mean()
    assert abs(float(tf_out["loss"]) - want) <= OUTPUT_ATOL


# --- training -----------------------------------------------------------------------------------
def test_dropout_changes_the_train_loss_and_train_step_runs():
    cfg = CFG.replace(dropout=0.1)
    model = WL.build("tf", cfg)
    batch = WL.synthetic_batch(cfg, batch_size=4, seed=6)
    eval_loss = WL.forward("tf", model, batch)["loss"]
    assert WL.forward("tf", model, batch)["loss"] == eval_loss  # eval mode is deterministic
    train_loss = WL.forward("tf", model, batch, train=True)["loss"]
    assert np.isfinite(train_loss) and train_loss != eval_loss
    optimizer = adapter.make_optimizer(*WL.optimizer(cfg), model)
    losses = [adapter.train_step(model, optimizer, batch) for _ in range(2)]
    assert np.isfinite(losses).all()


def test_lamb_train_step_reduces_the_loss_on_a_fixed_batch():
    # LAMB's step is relative to each weight's norm: with the tiny preset's lr (1e-3) weights
    # move 0.1% per step and 30 steps lower the loss by 3% only; 1e-2 shows learning clearly.
    cfg = WL.deterministic(CFG.replace(lr=1e-2))
    model = WL.build("tf", cfg, weights=WL.init_canonical(cfg, seed=1))
    optimizer = adapter.make_optimizer(*WL.optimizer(cfg), model)
    batch = WL.synthetic_batch(cfg, batch_size=4, seed=7)
    losses = [adapter.train_step(model, optimizer, batch) for _ in range(30)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.85 * losses[0], losses

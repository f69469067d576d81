"""GPT-3 and GPT-J in TensorFlow (Keras 3): rotary positions, causal rotary attention and the
parallel block against the float64 numpy reference (``numpy_reference.py``), the whole decoder
against ``numpy_reference.gpt`` in float64 and float32, the fused path, canonical names,
gradients, generation and a training step."""

from __future__ import annotations

import numpy as np
import numpy_reference as ref
import pytest

pytestmark = pytest.mark.requires("tf")

from mlperf_tutor import workloads  # noqa: E402
from mlperf_tutor.frameworks import tf as adapter  # noqa: E402
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec  # noqa: E402
from mlperf_tutor.layers.tf.attention import Attention  # noqa: E402
from mlperf_tutor.layers.tf.block import TransformerBlock  # noqa: E402
from mlperf_tutor.layers.tf.rotary import apply_rotary  # noqa: E402
from mlperf_tutor.workloads.gpt import tf_model  # noqa: E402
from mlperf_tutor.workloads.gpt.data import token_cross_entropy  # noqa: E402

NAMES = ["gpt3", "gptj"]
B, D, N, F, R = 2, 16, 2, 24, 4  # the layers' test sizes: head dim 8, rotary on 4 of its dims
FLOAT64_ATOL = 1e-10
FLOAT32_ATOL = 1e-5


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def load_random(layer, x, seed=0) -> dict[str, np.ndarray]:
    """Build ``layer`` on ``x``, load random canonical weights in its dtype, return them."""
    layer(x)
    rng = np.random.default_rng(seed)
    tree = {}
    for leaf in adapter.leaves(layer):
        shape, dtype = leaf.spec
        base = 1.0 if "norm." in leaf.name and leaf.name.endswith("weight") else 0.0
        tree[leaf.name] = (base + 0.3 * rng.standard_normal(shape)).astype(dtype)
    adapter.load_canonical(layer, tree)
    return {k: v.astype(np.float64) for k, v in tree.items()}


def random_weights(wl, cfg, seed) -> dict[str, np.ndarray]:
    """``init_canonical`` with its std raised fivefold and random norms and biases, so that
    attention is far from uniform and a misplaced bias or norm shows (float64)."""
    rng = np.random.default_rng(seed + 100)
    tree = {}
    for name, value in wl.init_canonical(cfg, seed=seed).items():
        value = value.astype(np.float64)
        if value.ndim == 1:
            value = value + 0.1 * rng.standard_normal(value.shape)
        else:
            value = 5.0 * value
        tree[name] = value
    return tree


# --- rotary, attention, block ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize(("t", "base"), [(5, 10000.0), (7, 500.0)])
def test_apply_rotary_matches_numpy(layout, t, base):
    x = np.random.default_rng(t).standard_normal((B, t, 3, 8))  # rotary on 6 of 8 dims
    got = apply_rotary(adapter.from_numpy(x), 6, base, layout)
    assert got.dtype.name == "float64"
    assert max_abs(got, ref.rotary(x, 6, layout, base)) <= FLOAT64_ATOL
    got32 = apply_rotary(adapter.from_numpy(x, "float32"), 6, base, layout)
    assert got32.dtype.name == "float32"
    assert max_abs(got32, ref.rotary(x, 6, layout, base)) <= FLOAT32_ATOL
    with pytest.raises(ValueError, match="rotary_layout must be one of"):
        apply_rotary(adapter.from_numpy(x), 6, base, "neox")


@pytest.mark.parametrize("t", [5, 7])
def test_causal_rotary_attention_matches_numpy(t):
    x = np.random.default_rng(t).standard_normal((B, t, D))
    layer = Attention(AttentionSpec(D, N, causal=True, rotary_dim=R), dtype="float64")
    tree = load_random(layer, x, seed=t)
    want = ref.attention(tree, x, N, causal=True, rotary_dim=R)
    assert max_abs(layer(x), want) <= FLOAT64_ATOL


@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "fused"])
def test_future_tokens_do_not_change_earlier_outputs(fused):
    x = np.random.default_rng(1).standard_normal((B, 7, D)).astype(np.float32)
    layer = Attention(AttentionSpec(D, N, causal=True, rotary_dim=R, fused=fused))
    load_random(layer, x, seed=1)
    changed = x.copy()
    changed[:, -1] += 1.0
    before, after = adapter.to_numpy(layer(x)), adapter.to_numpy(layer(changed))
    np.testing.assert_array_equal(before[:, :-1], after[:, :-1])
    assert not np.allclose(before[:, -1], after[:, -1])


def test_parallel_block_matches_numpy_and_has_no_mlp_norm():
    x = np.random.default_rng(2).standard_normal((B, 7, D))
    spec = BlockSpec(
        AttentionSpec(D, N, bias=False, causal=True, rotary_dim=R),
        MlpSpec(D, F, activation="gelu_tanh"),
        norm_eps=1e-5,
        norm_position="parallel",
    )
    layer = TransformerBlock(spec, dtype="float64")
    tree = load_random(layer, x, seed=2)
    assert not hasattr(layer, "mlp_norm") and not any(k.startswith("mlp_norm") for k in tree)
    assert "attention.q_proj.bias" not in tree and "mlp.fc_in.bias" in tree
    want = ref.block(
        tree, x, N, 1e-5, "parallel", causal=True, activation="gelu_tanh", rotary_dim=R
    )
    assert max_abs(layer(x), want) <= FLOAT64_ATOL


# --- the decoder ----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=NAMES)
def run(request):
    """Workload, tiny config, weights, a batch of T = 7 with ignored labels, and the numpy
    reference's outputs; every model is built once."""
    wl = workloads.get(request.param)
    cfg = wl.config("tiny")
    tree = random_weights(wl, cfg, seed=3)
    batch = {k: v[:, :7] for k, v in wl.synthetic_batch(cfg, batch_size=3, seed=4).items()}
    batch["labels"][0, :3] = batch["labels"][2, -1] = -100
    tree32 = {k: v.astype(np.float32) for k, v in tree.items()}
    models = {"float64": tf_model.build(cfg, dtype="float64"), "float32": tf_model.build(cfg)}
    models["fused"] = tf_model.build(cfg, fused=True)
    adapter.load_canonical(models["float64"], tree)
    adapter.load_canonical(models["float32"], tree32)
    adapter.load_canonical(models["fused"], tree32)
    want = ref.gpt(tree, cfg, batch["input_ids"], batch["labels"])
    return {"wl": wl, "cfg": cfg, "tree": tree, "batch": batch, "want": want, **models}


def test_decoder_matches_numpy_in_float64(run):
    out = run["wl"].forward("tf", run["float64"], run["batch"])
    assert out["logits"].shape == (3, 7, run["cfg"].padded_vocab_size)
    assert max_abs(out["logits"], run["want"]["logits"]) <= FLOAT64_ATOL
    assert out["loss"].dtype == np.float64
    assert abs(float(out["loss"]) - run["want"]["loss"]) <= FLOAT64_ATOL


def test_decoder_matches_numpy_in_float32(run):
    out = run["wl"].forward("tf", run["float32"], run["batch"])
    assert out["loss"].dtype == np.float32
    assert max_abs(out["logits"], run["want"]["logits"]) <= FLOAT32_ATOL
    assert abs(float(out["loss"]) - run["want"]["loss"]) <= FLOAT32_ATOL


def test_loss_is_the_mean_over_labels_that_are_not_ignored(run):
    out = run["wl"].forward("tf", run["float64"], run["batch"])
    total, count = token_cross_entropy(out["logits"], run["batch"]["labels"])
    assert count == run["batch"]["labels"].size - 4
    assert abs(float(out["loss"]) - total / count) <= FLOAT64_ATOL


def test_batch_without_labels_gives_logits_only_at_any_length(run):
    ids = run["batch"]["input_ids"][:, :5]
    out = run["wl"].forward("tf", run["float64"], {"input_ids": ids})
    assert set(out) == {"logits"}
    want = ref.gpt(run["tree"], run["cfg"], ids)["logits"]
    assert max_abs(out["logits"], want) <= FLOAT64_ATOL


def test_fused_attention_equals_the_explicit_path(run):
    explicit = run["wl"].forward("tf", run["float32"], run["batch"])
    fused = run["wl"].forward("tf", run["fused"], run["batch"])
    assert max_abs(fused["logits"], explicit["logits"]) <= FLOAT32_ATOL
    assert abs(float(fused["loss"]) - float(explicit["loss"])) <= FLOAT32_ATOL


def test_generation_is_greedy_over_the_real_vocabulary(run):
    wl, cfg = run["wl"], run["cfg"]
    prompt = run["batch"]["input_ids"][:2, :3]
    tokens = wl.generate("tf", run["float64"], cfg, prompt, 3)
    assert tokens.shape == (2, 6) and np.array_equal(tokens[:, :3], prompt)
    for t in range(3, 6):
        logits = ref.gpt(run["tree"], cfg, tokens[:, :t])["logits"][:, -1, : cfg.vocab_size]
        assert np.array_equal(tokens[:, t], logits.argmax(-1))


# --- the adapter ----------------------------------------------------------------------------
def test_layers_are_named_by_their_canonical_path_and_follow_the_config(run):
    cfg, model = run["cfg"], run["float32"]
    assert model.blocks[1].attention.q_proj.kernel.path.endswith("blocks.1/attention/q_proj/kernel")
    assert hasattr(model, "lm_head") != cfg.tie_embeddings
    assert hasattr(model.embeddings, "position_embeddings") == (cfg.position == "learned")


def test_train_step_with_dropout_runs_in_a_graph_at_two_lengths():
    wl = workloads.get("gptj")
    cfg = wl.config("tiny", dropout=0.1)
    model = wl.build("tf", cfg)
    optimizer = adapter.make_optimizer(*wl.optimizer(cfg), model)
    batch = wl.synthetic_batch(cfg, batch_size=2, seed=5)
    short = {k: v[:, :9] for k, v in batch.items()}
    losses = [adapter.train_step(model, optimizer, b) for b in (batch, short, batch)]
    assert np.isfinite(losses).all()
    eval_loss = wl.forward("tf", model, batch)["loss"]
    assert wl.forward("tf", model, batch, train=True)["loss"] != eval_loss

"""GPT-3 and GPT-J in JAX (Flax NNX): rotary positions, causal and parallel blocks, and the whole
decoder against the float64 numpy reference (``numpy_reference.py``), fused attention, canonical
names and gradients through the adapter."""

from __future__ import annotations

import numpy as np
import numpy_reference as ref
import pytest

pytestmark = pytest.mark.requires("jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mlperf_tutor import frameworks, workloads  # noqa: E402
from mlperf_tutor.core.parity import OUTPUT_ATOL  # noqa: E402
from mlperf_tutor.layers.jax.attention import Attention  # noqa: E402
from mlperf_tutor.layers.jax.block import TransformerBlock  # noqa: E402
from mlperf_tutor.layers.jax.rotary import apply_rotary  # noqa: E402
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec  # noqa: E402
from mlperf_tutor.workloads.gpt import jax_model as gpt_jax  # noqa: E402

fj = frameworks.get("jax")
GPT3, GPTJ = workloads.get("gpt3"), workloads.get("gptj")
NAMES = ["gpt3", "gptj"]
B, D, N, F, R = 2, 32, 4, 48, 6  # head dim 8, rotary on 6 of its dims
FLOAT64_ATOL = 1e-10


@pytest.fixture(scope="module", autouse=True)
def _pinned():
    fj.pin_precision()


# --- helpers ----------------------------------------------------------------------------------
def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def randomise(module: nnx.Module, seed: int) -> dict[str, np.ndarray]:
    """Load random float32 weights into ``module``; return them in float64."""
    rng = np.random.default_rng(seed)
    tree = {}
    for name, value in fj.to_canonical(module).items():
        base = 1.0 if "norm." in name and name.endswith("weight") else 0.0
        tree[name] = (base + 0.3 * rng.standard_normal(value.shape)).astype(np.float32)
    fj.load_canonical(module, tree)
    return {k: v.astype(np.float64) for k, v in tree.items()}


def to_float64(model: nnx.Module) -> None:
    """Cast every parameter of ``model`` to float64 (call inside ``jax.enable_x64``)."""
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(var.get_value(), jnp.float64))


@nnx.jit
def _apply(module, x):
    return module(x)


def gpt_weights(wl, cfg, seed: int) -> dict[str, np.ndarray]:
    """``init_canonical`` with larger matrices and random norms and biases (so that each one
    shows in the logits), float32 values."""
    rng = np.random.default_rng(seed)
    tree = {}
    for name, value in wl.init_canonical(cfg, seed=seed).items():
        if value.ndim == 2:
            value = 10.0 * value  # std 0.2: logits of order one
        else:
            value = value + 0.1 * rng.standard_normal(value.shape)
        tree[name] = value.astype(np.float32)
    return tree


def gpt_batch(wl, cfg, t: int, seed: int = 1) -> dict[str, np.ndarray]:
    """B sequences of ``t`` (odd) tokens, some labels -100."""
    batch = wl.synthetic_batch(cfg, batch_size=B, seed=seed)
    batch = {k: v[:, :t] for k, v in batch.items()}
    batch["labels"][0, 1] = batch["labels"][1, [0, t - 1]] = -100
    return batch


# --- rotary and the blocks ----------------------------------------------------------------
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("t", [5, 7])
def test_apply_rotary_matches_numpy_in_float64(layout, t):
    x = np.random.default_rng(t).standard_normal((B, t, 3, 8))
    with jax.enable_x64(True):
        got = apply_rotary(jnp.asarray(x), R, layout=layout)
        assert got.dtype == jnp.float64
        got = np.asarray(got)
    want = ref.rotary(x, R, layout)
    assert max_abs(got, want) <= 1e-12
    assert np.array_equal(got[..., R:], x[..., R:])  # dims past rotary_dim pass through
    assert np.array_equal(got[:, 0], x[:, 0])  # position 0 is not rotated


def test_apply_rotary_keeps_the_dtype_and_refuses_bad_arguments():
    x = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
    assert apply_rotary(x, 4).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="half"):
        apply_rotary(x, 4, layout="neox")
    with pytest.raises(ValueError, match="even"):
        apply_rotary(x, 3)


@pytest.mark.parametrize(
    "t, layout, num_kv_heads", [(5, "interleaved", None), (7, "half", None), (7, "interleaved", 2)]
)
def test_causal_rotary_attention_matches_numpy(t, layout, num_kv_heads):
    spec = AttentionSpec(
        D, N, num_kv_heads=num_kv_heads, causal=True, rotary_dim=R, rotary_layout=layout
    )
    attention = Attention(spec, rngs=nnx.Rngs(0))
    w = randomise(attention, seed=t)
    x = np.random.default_rng(t).standard_normal((B, t, D)).astype(np.float32)
    got = _apply(attention, jnp.asarray(x))
    want = ref.attention(
        w, x.astype(np.float64), N, num_kv_heads, causal=True, rotary_dim=R, rotary_layout=layout
    )
    assert got.shape == (B, t, D)
    assert max_abs(got, want) <= OUTPUT_ATOL


@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "fused"])
def test_future_tokens_do_not_change_earlier_outputs(fused):
    spec = AttentionSpec(D, N, causal=True, fused=fused, rotary_dim=R)
    attention = Attention(spec, rngs=nnx.Rngs(0))
    randomise(attention, seed=2)
    x = np.random.default_rng(2).standard_normal((B, 7, D)).astype(np.float32)
    changed = x.copy()
    changed[:, -1] += 1.0
    a, b = np.asarray(_apply(attention, jnp.asarray(x))), np.asarray(_apply(attention, changed))
    assert np.array_equal(a[:, :-1], b[:, :-1])
    assert max_abs(a[:, -1], b[:, -1]) > 1e-3


def test_parallel_block_matches_numpy():
    spec = BlockSpec(
        AttentionSpec(D, N, bias=False, causal=True, rotary_dim=R),
        MlpSpec(D, F, activation="gelu_tanh"),
        norm_eps=1e-5,
        norm_position="parallel",
    )
    block = TransformerBlock(spec, rngs=nnx.Rngs(0))
    assert not hasattr(block, "mlp_norm")
    w = randomise(block, seed=3)
    assert {k.split(".")[0] for k in w} == {"attention", "attention_norm", "mlp"}
    assert "attention.q_proj.bias" not in w and "mlp.fc_in.bias" in w  # attention_bias apart
    x = np.random.default_rng(3).standard_normal((B, 7, D)).astype(np.float32)
    want = ref.block(
        w,
        x.astype(np.float64),
        N,
        1e-5,
        "parallel",
        causal=True,
        activation="gelu_tanh",
        rotary_dim=R,
    )
    assert max_abs(_apply(block, jnp.asarray(x)), want) <= OUTPUT_ATOL


def test_out_bias_defaults_to_bias():
    spec = BlockSpec(AttentionSpec(D, N, bias=False), MlpSpec(D, F, bias=False), norm_eps=1e-5)
    block = TransformerBlock(spec, rngs=nnx.Rngs(0))
    assert not any(k.endswith("bias") and "norm" not in k for k in fj.to_canonical(block))
    with pytest.raises(ValueError, match="parallel"):
        BlockSpec(spec.attention, spec.mlp, norm_eps=1e-5, norm_position="sandwich")


# --- the decoders ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=NAMES)
def case(request):
    """The workload, its deterministic tiny config, random weights and a batch of 7 tokens."""
    wl = workloads.get(request.param)
    cfg = wl.deterministic(wl.config("tiny"))
    tree = gpt_weights(wl, cfg, seed=4)
    batch = gpt_batch(wl, cfg, t=7)
    w = {k: v.astype(np.float64) for k, v in tree.items()}
    want = ref.gpt(w, cfg, batch["input_ids"], batch["labels"])
    return {"wl": wl, "cfg": cfg, "tree": tree, "batch": batch, "want": want}


def test_decoder_matches_numpy_in_float64(case):
    cfg, tree, batch = case["cfg"], case["tree"], case["batch"]
    with jax.enable_x64(True):
        model = gpt_jax.build(cfg)
        to_float64(model)
        fj.load_canonical(model, {k: v.astype(np.float64) for k, v in tree.items()})
        got = fj.forward(model, batch)
    assert got["logits"].dtype == np.float64 and got["loss"].dtype == np.float64
    assert got["logits"].shape == (B, 7, cfg.padded_vocab_size)
    assert max_abs(got["logits"], case["want"]["logits"]) <= FLOAT64_ATOL
    assert max_abs(got["loss"], case["want"]["loss"]) <= FLOAT64_ATOL


def test_decoder_matches_numpy_in_float32(case):
    model = case["wl"].build("jax", case["cfg"], weights=case["tree"])
    got = fj.forward(model, case["batch"])
    assert got["logits"].dtype == np.float32
    assert max_abs(got["logits"], case["want"]["logits"]) <= OUTPUT_ATOL
    assert max_abs(got["loss"], case["want"]["loss"]) <= OUTPUT_ATOL
    # More tokens labelled -100 change the mean to the one over the rest; a batch without
    # labels is generation: logits only.
    masked = dict(case["batch"], labels=case["batch"]["labels"].copy())
    masked["labels"][:, :3] = -100
    want = ref.gpt(
        {k: v.astype(np.float64) for k, v in case["tree"].items()},
        case["cfg"],
        masked["input_ids"],
        masked["labels"],
    )["loss"]
    assert max_abs(fj.forward(model, masked)["loss"], want) <= OUTPUT_ATOL
    assert set(fj.forward(model, {"input_ids": case["batch"]["input_ids"]})) == {"logits"}


def test_fused_decoder_matches_explicit(case):
    explicit = fj.forward(case["wl"].build("jax", case["cfg"], weights=case["tree"]), case["batch"])
    fused = gpt_jax.build(case["cfg"], fused=True, fused_implementation="xla")
    fj.load_canonical(fused, case["tree"])
    got = fj.forward(fused, case["batch"])
    for key in ("logits", "loss"):
        assert max_abs(got[key], explicit[key]) <= OUTPUT_ATOL, key


def test_head_and_position_table_follow_the_config(case):
    exported = fj.to_canonical(gpt_jax.build(case["cfg"]))
    assert ("embeddings.position_embeddings.weight" in exported) == (
        case["cfg"].position == "learned"
    )
    assert ("lm_head.weight" in exported) == (not case["cfg"].tie_embeddings)


def test_dropout_is_random_in_train_mode():
    cfg = GPTJ.config("tiny", dropout=0.3)
    model = GPTJ.build("jax", cfg, weights=gpt_weights(GPTJ, cfg, seed=5))
    batch = gpt_batch(GPTJ, cfg, t=5)
    first, second = (fj.forward(model, batch, train=True)["loss"] for _ in range(2))
    evals = [fj.forward(model, batch)["loss"] for _ in range(2)]
    assert np.isfinite([first, second]).all() and first != second and evals[0] == evals[1]
    # JAX's fused kernel has no attention-probability dropout: the accelerator build keeps the
    # explicit attention where the config has dropout (tests/test_train.py trains it).
    assert not gpt_jax.build(cfg, fused=True).spec.attention.fused
    assert gpt_jax.build(GPTJ.deterministic(cfg), fused=True).spec.attention.fused

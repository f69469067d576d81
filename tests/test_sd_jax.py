"""The Stable Diffusion v2 UNet in JAX (Flax NNX), its conv blocks and the shared layers'
cross-attention.

The conv blocks are checked against PyTorch's functional ops on the same numbers (NCHW/OIHW
there, NHWC/HWIO here), the cross-attention against a float64 formula, and the whole UNet against
diffusers' own ``UNet2DConditionModel`` holding the same weights (``sd_reference``) and against
the PyTorch model (outputs, gradients, AdamW steps).
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest
from checks import max_abs, random_tree
from sd_reference import random_batch

pytestmark = pytest.mark.requires("jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mlperf_tutor import frameworks, workloads  # noqa: E402
from mlperf_tutor.core.parity import OUTPUT_ATOL, STEP_RTOL, errors  # noqa: E402
from mlperf_tutor.layers.jax.attention import Attention  # noqa: E402
from mlperf_tutor.layers.jax.block import TransformerBlock  # noqa: E402
from mlperf_tutor.layers.jax.conv import (  # noqa: E402
    Downsample,
    ResnetBlock,
    Upsample,
    timestep_sinusoid,
)
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec  # noqa: E402
from mlperf_tutor.workloads.stable_diffusion import diffusion, jax_model, shapes  # noqa: E402

fj = frameworks.get("jax")
WL = workloads.get("stable_diffusion")
TINY = WL.config("tiny")
# Two blocks per spatial transformer, three levels, no attention at level 0: the plan's other
# branches (a level without transformers, a resnet without conv_shortcut on the way down).
DEEP = WL.config("tiny", transformer_depth=2, channel_mult=(1, 2, 2), attention_levels=(1, 2))
F64_ATOL = 1e-10


@pytest.fixture(scope="module", autouse=True)
def _pinned():
    fj.pin_precision()


def load_random(module: nnx.Module, seed: int) -> dict[str, np.ndarray]:
    """Load ``checks.random_tree`` weights into ``module`` and return them."""
    tree = random_tree(fj.to_canonical(module), seed)
    fj.load_canonical(module, tree)
    return tree


@pytest.fixture(scope="module")
def tiny():
    """(model, weights, batch, outputs): the tiny UNet with random weights, one forward."""
    tree = random_tree(WL.init_canonical(TINY), seed=0)
    model = WL.build("jax", TINY, weights=tree)
    batch = random_batch(TINY)
    return model, tree, batch, fj.forward(model, batch)


# --- layers ---------------------------------------------------------------------------------
def test_cross_attention_matches_a_plain_formula():
    dim, heads, ctx_dim = 16, 2, 12
    rng = np.random.default_rng(0)
    x, context = rng.standard_normal((2, 5, dim)), rng.standard_normal((2, 7, ctx_dim))
    with jax.enable_x64(True):
        spec = AttentionSpec(dim, heads, bias=False, out_bias=True, context_dim=ctx_dim)
        attn = Attention(spec, rngs=nnx.Rngs(0))
        for _, var in nnx.to_flat_state(nnx.state(attn, nnx.Param)):
            var.set_value(jnp.asarray(var.get_value(), jnp.float64))
        w = {k: rng.standard_normal(v.shape) / 3 for k, v in fj.to_canonical(attn).items()}
        fj.load_canonical(attn, w)
        got = np.asarray(nnx.jit(lambda m, a, c: m(a, context=c))(attn, x, context))
    assert sorted(w) == [
        "k_proj.weight",
        "o_proj.bias",
        "o_proj.weight",
        "q_proj.weight",
        "v_proj.weight",
    ]
    assert w["k_proj.weight"].shape == (dim, ctx_dim)

    def split(a):  # (B, S, D) -> (B, N, S, H)
        return a.reshape(*a.shape[:2], heads, -1).transpose(0, 2, 1, 3)

    q, k, v = (
        split(x @ w["q_proj.weight"].T),
        split(context @ w["k_proj.weight"].T),
        split(context @ w["v_proj.weight"].T),
    )
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dim // heads)  # (B, N, T, S)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mixed = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape)  # (B, T, D)
    want = mixed @ w["o_proj.weight"].T + w["o_proj.bias"]
    assert max_abs(got, want) <= F64_ATOL


def pre_block(attention: AttentionSpec, cross: bool = False) -> BlockSpec:
    """A pre-norm block over 16 channels with a 32-wide MLP; with ``cross``, a cross-attention
    to an 8-wide context beside ``attention``."""
    return BlockSpec(
        attention,
        MlpSpec(16, 32),
        norm_eps=1e-5,
        norm_position="pre",
        cross_attention=attention.cross(8) if cross else None,
    )


def test_cross_attention_is_refused_where_it_has_no_meaning():
    rngs = nnx.Rngs(0)
    for bad in (dict(causal=True), dict(rotary_dim=4), dict(fused_qkv=True)):
        with pytest.raises(ValueError, match="cross-attention"):
            AttentionSpec(16, 2, context_dim=8, **bad)
    spec = pre_block(AttentionSpec(16, 2), cross=True)
    with pytest.raises(ValueError, match="norm_position 'pre'"):
        dataclasses.replace(spec, norm_position="post")
    x, context = jnp.zeros((1, 3, 16)), jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match="context_dim"):
        Attention(AttentionSpec(16, 2), rngs=rngs)(x, context=context)
    with pytest.raises(ValueError, match="context_dim"):
        Attention(AttentionSpec(16, 2, context_dim=8), rngs=rngs)(x)
    with pytest.raises(ValueError, match="context_dim"):
        TransformerBlock(pre_block(AttentionSpec(16, 2)), rngs=rngs)(x, None, context)


def test_blocks_without_context_keep_their_names():
    block = TransformerBlock(pre_block(AttentionSpec(16, 2)), rngs=nnx.Rngs(0))
    assert block.cross_attention is None and block.cross_attention_norm is None
    assert not any("cross" in k for k in fj.to_canonical(block))
    # out_bias follows bias unless given; an out_bias only touches o_proj.
    spec = pre_block(AttentionSpec(16, 2, bias=False, out_bias=True), cross=True)
    names = fj.to_canonical(TransformerBlock(spec, rngs=nnx.Rngs(0)))
    assert {k for k in names if k.endswith("proj.bias")} == {
        "attention.o_proj.bias",
        "cross_attention.o_proj.bias",
    }
    assert names["cross_attention.k_proj.weight"].shape == (16, 8)


@pytest.mark.requires("torch")
def test_conv_blocks_match_torch_functional_ops():
    import torch

    F = torch.nn.functional
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 8, 8)).astype(np.float32)  # NCHW
    temb = rng.standard_normal((2, 10)).astype(np.float32)

    def nhwc(a):
        return jnp.asarray(a.transpose(0, 2, 3, 1))

    def nchw(a):
        return np.asarray(a).transpose(0, 3, 1, 2)

    resnet = ResnetBlock(6, 4, 10, groups=2, eps=1e-5, rngs=nnx.Rngs(0))
    w = {k: torch.from_numpy(v) for k, v in load_random(resnet, seed=3).items()}
    tx = torch.from_numpy(x)
    h = F.conv2d(
        F.silu(F.group_norm(tx, 2, w["norm1.weight"], w["norm1.bias"], 1e-5)),
        w["conv1.weight"],
        w["conv1.bias"],
        padding=1,
    )
    shift = F.linear(
        F.silu(torch.from_numpy(temb)), w["time_emb_proj.weight"], w["time_emb_proj.bias"]
    )
    h = h + shift[:, :, None, None]
    h = F.conv2d(
        F.silu(F.group_norm(h, 2, w["norm2.weight"], w["norm2.bias"], 1e-5)),
        w["conv2.weight"],
        w["conv2.bias"],
        padding=1,
    )
    want = F.conv2d(tx, w["conv_shortcut.weight"], w["conv_shortcut.bias"]) + h
    got = nchw(resnet(nhwc(x), jnp.asarray(temb)))
    assert max_abs(got, want.numpy()) <= OUTPUT_ATOL

    down, up = Downsample(6, rngs=nnx.Rngs(0)), Upsample(6, rngs=nnx.Rngs(0))
    for module, scale in ((down, None), (up, 2)):
        w = {k: torch.from_numpy(v) for k, v in load_random(module, seed=4).items()}
        conv = dict(weight=w["conv.weight"], bias=w["conv.bias"], padding=1)
        if scale is None:
            want = F.conv2d(tx, stride=2, **conv)  # (B, C, 4, 4): PyTorch pads every side
        else:
            want = F.conv2d(F.interpolate(tx, scale_factor=2.0, mode="nearest"), **conv)
        got = nchw(module(nhwc(x)))
        assert got.shape == tuple(want.shape) and max_abs(got, want.numpy()) <= OUTPUT_ATOL

    t = np.array([0, 1, 17, 999])
    half = 16
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.from_numpy(t).float()[:, None] * freqs[None]
    want = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).numpy()
    got = np.asarray(timestep_sinusoid(jnp.asarray(t), 2 * half))
    # t = 999 puts the angles near 1000, where a float32 ulp is 6e-5: the two libraries' sin
    # and cos differ there by ~2e-6 (the float32 bar, not 1e-6).
    assert got.dtype == np.float32 and max_abs(got, want) <= OUTPUT_ATOL


# --- the UNet ---------------------------------------------------------------------------------
def test_canonical_names_and_shapes_follow_the_plan(tiny):
    for cfg, model in ((TINY, tiny[0]), (DEEP, jax_model.build(DEEP))):
        exported = fj.to_canonical(model)
        assert {k: v.shape for k, v in exported.items()} == shapes.canonical_shapes(cfg)
        assert {v.dtype for v in exported.values()} == {np.dtype(np.float32)}


@pytest.mark.requires("torch", "hf")
def test_prediction_matches_diffusers_and_the_loss_its_formula(tiny):
    from sd_reference import diffusers_prediction

    model, tree, batch, out = tiny
    x_t, v = diffusion.noisy_and_target(TINY, batch["latents"], batch["noise"], batch["timesteps"])
    want = diffusers_prediction(TINY, tree, x_t, batch["timesteps"], batch["context"])
    assert out["prediction"].shape == want.shape and out["prediction"].dtype == np.float32
    assert max_abs(out["prediction"], want) <= OUTPUT_ATOL
    loss = np.mean((out["prediction"].astype(np.float64) - v) ** 2)
    assert abs(out["loss"] - loss) <= OUTPUT_ATOL
    # denoise (the sampler's entry) is the UNet alone, NCHW in and out
    denoised = nnx.jit(lambda m, x, t, c: m.denoise(x, t, c))(
        model, x_t, batch["timesteps"], batch["context"]
    )
    assert max_abs(denoised, out["prediction"]) <= OUTPUT_ATOL  # x_t: numpy's, not XLA's


def test_fused_attention_path_matches_the_explicit_one(tiny):
    _, tree, batch, out = tiny
    model = jax_model.build(TINY, fused=True, fused_implementation="xla")
    fj.load_canonical(model, tree)
    fused = fj.forward(model, batch)
    for key in ("prediction", "loss"):
        assert max_abs(fused[key], out[key]) <= OUTPUT_ATOL, key


def test_bf16_build_computes_in_bf16_with_a_float32_loss(tiny):
    _, tree, batch, _ = tiny
    model = jax_model.build(TINY, dtype=jnp.bfloat16)
    fj.load_canonical(model, {k: v.astype(ml_dtypes.bfloat16) for k, v in tree.items()})
    out = fj.forward(model, batch)
    # Float32 inputs would promote every Flax layer back to float32 arithmetic.
    assert out["prediction"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert out["loss"].dtype == np.float32 and np.isfinite(out["loss"])


@pytest.mark.requires("torch")
def test_forward_grads_and_adamw_steps_match_torch(tiny):
    ft = frameworks.get("torch")
    ft.pin_precision()
    model, tree, batch, out = tiny
    torch_model = WL.build("torch", TINY, weights=tree)
    want = ft.forward(torch_model, batch)
    for key in ("prediction", "loss"):
        assert max_abs(out[key], want[key]) <= OUTPUT_ATOL, key
    grads = {
        "jax": fj.loss_and_grads(model, batch)[1],
        "torch": ft.loss_and_grads(torch_model, batch)[1],
    }
    assert set(grads["jax"]) == set(grads["torch"]) == set(tree)
    for name, g in grads["torch"].items():
        assert errors(grads["jax"][name], g)[1] <= STEP_RTOL, name
    models = {"jax": WL.build("jax", TINY, weights=tree), "torch": torch_model}
    adapters = {"jax": fj, "torch": ft}
    for fw, m in models.items():
        optimizer = adapters[fw].make_optimizer(*WL.optimizer(TINY), m)
        for step in range(3):
            adapters[fw].train_step(m, optimizer, random_batch(TINY, seed=10 + step))
    after = {fw: adapters[fw].to_canonical(m) for fw, m in models.items()}
    for name in tree:
        assert errors(after["jax"][name], after["torch"][name])[1] <= STEP_RTOL, name

"""The Stable Diffusion v2 UNet in TensorFlow (Keras 3): the new layers (cross-attention, timestep
sinusoid, residual block, down/upsampling) against PyTorch functional formulas in float64, the
canonical names, the UNet against diffusers' own ``UNet2DConditionModel`` (``sd_reference``), and
the loss, gradients and AdamW steps against the PyTorch model in float32."""

from __future__ import annotations

import math

import numpy as np
import pytest
from checks import max_abs, random_tree

# torch: the formulas and the PyTorch model that the layers are compared with.
pytestmark = pytest.mark.requires("tf", "torch")

from mlperf_tutor import workloads  # noqa: E402
from mlperf_tutor.core.parity import OUTPUT_ATOL, STEP_RTOL, errors  # noqa: E402
from mlperf_tutor.frameworks import tf as adapter  # noqa: E402
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec  # noqa: E402
from mlperf_tutor.layers.tf.attention import Attention  # noqa: E402
from mlperf_tutor.layers.tf.block import TransformerBlock  # noqa: E402
from mlperf_tutor.layers.tf.conv import (  # noqa: E402
    Downsample,
    ResnetBlock,
    Upsample,
    timestep_sinusoid,
)
from mlperf_tutor.workloads.stable_diffusion.diffusion import noisy_and_target  # noqa: E402
from mlperf_tutor.workloads.stable_diffusion.shapes import canonical_shapes  # noqa: E402

WL = workloads.get("stable_diffusion")
CFG = WL.deterministic(WL.config("tiny"))
F64_ATOL = 1e-10


def load_random(layer, *args, seed: int = 0, **kwargs) -> dict[str, np.ndarray]:
    """Build ``layer`` by calling it, load random weights in its dtype, return them (float64)."""
    layer(*args, **kwargs)
    dtype = layer.dtype_policy.variable_dtype
    tree = random_tree({leaf.name: leaf.spec[0] for leaf in adapter.leaves(layer)}, seed)
    adapter.load_canonical(layer, {k: v.astype(dtype) for k, v in tree.items()})
    return {k: v.astype(np.float64) for k, v in tree.items()}


def t64(a):
    import torch

    return torch.from_numpy(np.asarray(a, np.float64))


@pytest.fixture(scope="module")
def tree():
    return random_tree(canonical_shapes(CFG), seed=0)


@pytest.fixture(scope="module")
def batch():
    return WL.synthetic_batch(CFG, batch_size=2, seed=3)


@pytest.fixture(scope="module")
def model(tree):
    return WL.build("tf", CFG, weights=tree)


@pytest.fixture(scope="module")
def torch_model(tree):
    return WL.build("torch", CFG, weights=tree)


# --- layers ---------------------------------------------------------------------------------
def test_cross_attention_matches_the_torch_formula():
    import torch.nn.functional as F

    dim, heads, ctx_dim = 16, 4, 12
    rng = np.random.default_rng(0)
    x, context = rng.standard_normal((2, 5, dim)), rng.standard_normal((2, 7, ctx_dim))
    spec = AttentionSpec(dim, heads, bias=False, out_bias=True, context_dim=ctx_dim)
    layer = Attention(spec, dtype="float64")
    w = load_random(layer, x, context=context)
    assert sorted(w) == [
        "k_proj.weight",
        "o_proj.bias",
        "o_proj.weight",
        "q_proj.weight",
        "v_proj.weight",
    ]
    assert w["k_proj.weight"].shape == (dim, ctx_dim)

    def split(y):  # (B, S, D) -> (B, N, S, H)
        return y.reshape(*y.shape[:2], heads, dim // heads).transpose(1, 2)

    q = split(F.linear(t64(x), t64(w["q_proj.weight"])))
    k = split(F.linear(t64(context), t64(w["k_proj.weight"])))
    v = split(F.linear(t64(context), t64(w["v_proj.weight"])))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, dim)
    want = F.linear(out, t64(w["o_proj.weight"]), t64(w["o_proj.bias"])).numpy()
    assert max_abs(layer(x, context=context), want) <= F64_ATOL


def test_block_with_cross_attention_adds_a_pre_norm_branch():
    dim, ctx_dim = 16, 12
    rng = np.random.default_rng(1)
    x, context = rng.standard_normal((2, 5, dim)), rng.standard_normal((2, 3, ctx_dim))
    attention = AttentionSpec(dim, 4, bias=False, out_bias=True)
    spec = BlockSpec(
        attention,
        MlpSpec(dim, 64, gated=True),
        norm_eps=1e-5,
        norm_position="pre",
        cross_attention=attention.cross(ctx_dim),
    )
    block = TransformerBlock(spec, dtype="float64")
    w = load_random(block, x, context=context, seed=1)
    assert "cross_attention_norm.weight" in w and "attention.o_proj.bias" in w
    assert "attention.q_proj.bias" not in w and "mlp.fc_gate.bias" in w
    # The block minus its cross-attention branch is the plain pre-norm block.
    h = x + block.attention(block.attention_norm(x)).numpy()
    h = h + block.cross_attention(block.cross_attention_norm(h), context=context).numpy()
    want = h + block.mlp(block.mlp_norm(h)).numpy()
    assert max_abs(block(x, context=context), want) <= F64_ATOL


def test_cross_attention_arguments_are_checked():
    # What a cross-attention may be the spec refuses, before any layer is built; the layers
    # check that a call matches their spec.
    with pytest.raises(ValueError, match="supports neither causal"):
        Attention(AttentionSpec(16, 4, context_dim=8, causal=True))
    with pytest.raises(ValueError, match="supports neither causal"):
        Attention(AttentionSpec(16, 4, context_dim=8, rotary_dim=4))
    attention = AttentionSpec(16, 4)
    with pytest.raises(ValueError, match="needs norm_position 'pre'"):
        BlockSpec(attention, MlpSpec(16, 32), norm_eps=1e-5, cross_attention=attention.cross(8))
    x = np.zeros((1, 3, 16), np.float32)
    with pytest.raises(ValueError, match="needs a context"):
        Attention(AttentionSpec(16, 4, context_dim=8))(x)
    with pytest.raises(ValueError, match="needs a context"):
        Attention(AttentionSpec(16, 4))(x, context=np.zeros((1, 2, 16), np.float32))
    spec = BlockSpec(attention, MlpSpec(16, 32), norm_eps=1e-5)
    with pytest.raises(ValueError, match="no cross-attention"):
        TransformerBlock(spec)(x, context=np.zeros((1, 2, 8), np.float32))


def test_timestep_sinusoid_matches_the_torch_formula_cos_first():
    import torch

    t = np.array([0, 1, 17, 999], np.int32)
    half = 16
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.from_numpy(t).float()[:, None] * freqs[None]
    want = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).numpy()
    got = adapter.to_numpy(timestep_sinusoid(t, 2 * half))
    # TF's and torch's float32 exp differ by one ulp on 3 of the 16 frequencies (measured); at
    # t = 999 that moves the argument by ~6e-5 and cos/sin by up to 6.2e-6.
    assert got.dtype == np.float32 and max_abs(got, want) <= OUTPUT_ATOL


def test_resnet_block_matches_the_torch_formula():
    import torch.nn.functional as F

    rng = np.random.default_rng(2)
    x, temb = rng.standard_normal((2, 6, 6, 8)), rng.standard_normal((2, 20))  # NHWC
    block = ResnetBlock(8, 16, groups=4, eps=1e-5, dtype="float64")
    w = load_random(block, x, temb, seed=2)
    assert "conv_shortcut.weight" in w and w["conv1.weight"].shape == (16, 8, 3, 3)

    def norm(y, name):
        return F.group_norm(y, 4, t64(w[f"{name}.weight"]), t64(w[f"{name}.bias"]), eps=1e-5)

    def conv(y, name, padding):
        return F.conv2d(y, t64(w[f"{name}.weight"]), t64(w[f"{name}.bias"]), padding=padding)

    xc = t64(x).permute(0, 3, 1, 2)  # NCHW
    h = conv(F.silu(norm(xc, "norm1")), "conv1", 1)
    proj = F.linear(F.silu(t64(temb)), t64(w["time_emb_proj.weight"]), t64(w["time_emb_proj.bias"]))
    h = conv(F.silu(norm(h + proj[:, :, None, None], "norm2")), "conv2", 1)
    want = (conv(xc, "conv_shortcut", 0) + h).permute(0, 2, 3, 1).numpy()
    assert max_abs(block(x, temb), want) <= F64_ATOL


def test_downsample_pads_both_sides_and_upsample_repeats_pixels():
    import torch.nn.functional as F

    x = np.random.default_rng(3).standard_normal((2, 8, 8, 4))  # NHWC, even sides
    xc = t64(x).permute(0, 3, 1, 2)
    down = Downsample(4, dtype="float64")
    w = load_random(down, x, seed=3)
    want = F.conv2d(xc, t64(w["conv.weight"]), t64(w["conv.bias"]), stride=2, padding=1)
    got = down(x)
    assert tuple(got.shape) == (2, 4, 4, 4)
    assert max_abs(got, want.permute(0, 2, 3, 1).numpy()) <= F64_ATOL
    up = Upsample(4, dtype="float64")
    w = load_random(up, x, seed=4)
    big = F.interpolate(xc, scale_factor=2.0, mode="nearest")
    want = F.conv2d(big, t64(w["conv.weight"]), t64(w["conv.bias"]), padding=1)
    assert max_abs(up(x), want.permute(0, 2, 3, 1).numpy()) <= F64_ATOL


# --- the UNet -------------------------------------------------------------------------------
@pytest.mark.requires("hf")
def test_prediction_matches_diffusers_and_the_loss_the_numpy_formula(model, tree, batch):
    from sd_reference import diffusers_prediction

    out = WL.forward("tf", model, batch)
    x_t, v = noisy_and_target(CFG, batch["latents"], batch["noise"], batch["timesteps"])
    want = diffusers_prediction(CFG, tree, x_t, batch["timesteps"], batch["context"])
    assert out["prediction"].shape == want.shape and out["prediction"].dtype == np.float32
    assert max_abs(out["prediction"], want) <= OUTPUT_ATOL
    loss = np.mean((out["prediction"].astype(np.float64) - v) ** 2)
    assert abs(float(out["loss"]) - loss) <= 1e-6 * loss
    # denoise is the UNet alone, NCHW in and out.
    denoised = model.denoise(x_t, batch["timesteps"], batch["context"])
    assert max_abs(denoised, out["prediction"]) <= 1e-6


def test_loss_prediction_and_gradients_match_torch(model, torch_model, batch):
    want = WL.forward("torch", torch_model, batch)
    got = WL.forward("tf", model, batch)
    assert max_abs(got["prediction"], want["prediction"]) <= OUTPUT_ATOL
    assert abs(float(got["loss"]) - float(want["loss"])) <= OUTPUT_ATOL
    loss, grads = adapter.loss_and_grads(model, batch)
    torch_loss, torch_grads = WL.adapter("torch").loss_and_grads(torch_model, batch)
    assert abs(loss - torch_loss) <= OUTPUT_ATOL
    assert set(grads) == set(torch_grads) == set(canonical_shapes(CFG))
    for name, g in grads.items():
        assert errors(g, torch_grads[name])[1] <= STEP_RTOL, name

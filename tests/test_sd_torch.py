"""The Stable Diffusion v2 UNet in PyTorch, its conv blocks and the shared layers' cross-attention.

Checked against diffusers' own ``UNet2DConditionModel`` holding the same weights
(``sd_reference``), and the cross-attention against a plain float64 formula.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checks import max_abs, randomized
from sd_reference import diffusers_prediction, diffusers_unet, random_batch

from mlperf_tutor import frameworks
from mlperf_tutor.core.parity import OUTPUT_ATOL
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec
from mlperf_tutor.layers.torch.attention import Attention
from mlperf_tutor.layers.torch.block import TransformerBlock
from mlperf_tutor.layers.torch.conv import Downsample, Upsample, timestep_sinusoid
from mlperf_tutor.workloads.stable_diffusion import diffusion, shapes, torch_model
from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig

pytestmark = pytest.mark.requires("torch", "hf")

ADAPTER = frameworks.get("torch")
TINY = StableDiffusionConfig.preset("tiny")
# Two blocks per spatial transformer, three levels, no attention at level 0: the plan's other
# branches (a level without transformers, a resnet without conv_shortcut on the way down).
DEEP = StableDiffusionConfig.preset(
    "tiny", transformer_depth=2, channel_mult=(1, 2, 2), attention_levels=(1, 2)
)


@pytest.fixture(scope="module", params=[TINY, DEEP], ids=["tiny", "deep"])
def unet(request):
    """(cfg, model, weights) with randomized float32 weights."""
    cfg = request.param
    model = torch_model.build(cfg)
    return cfg, model, randomized(model, seed=0)


def _denoise(model, x, t, context) -> np.ndarray:
    with torch.no_grad():
        v = model.denoise(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context))
    return v.float().numpy()


# --- the UNet ---------------------------------------------------------------------------------


def test_canonical_names_and_shapes(unet):
    cfg, model, _ = unet
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == shapes.canonical_shapes(cfg)


def test_prediction_matches_diffusers(unet):
    cfg, model, tree = unet
    batch = random_batch(cfg)
    x_t, v = diffusion.noisy_and_target(cfg, batch["latents"], batch["noise"], batch["timesteps"])
    out = ADAPTER.forward(model, batch)
    want = diffusers_prediction(cfg, tree, x_t, batch["timesteps"], batch["context"])
    assert out["prediction"].dtype == np.float32 and out["prediction"].shape == x_t.shape
    assert max_abs(out["prediction"], want) <= OUTPUT_ATOL
    loss = np.mean((out["prediction"].astype(np.float64) - v) ** 2)
    assert out["loss"].shape == () and abs(float(out["loss"]) - loss) <= 1e-6 * loss


def test_float64_matches_diffusers_to_round_off():
    # In float64 any structural difference would show above round-off.
    model = torch_model.build(DEEP)
    tree = randomized(model, seed=4)
    batch = random_batch(DEEP)
    x, t, ctx = (batch[k].astype(np.float64) for k in ("noise", "timesteps", "context"))
    ref = diffusers_unet(DEEP, tree).double()
    with torch.no_grad():
        want = ref(
            torch.from_numpy(x),
            torch.from_numpy(t).long(),
            encoder_hidden_states=torch.from_numpy(ctx),
        ).sample.numpy()
        got = model.double().denoise(*(torch.from_numpy(a) for a in (x, t, ctx))).numpy()
    assert max_abs(got, want) <= 1e-10 * max(1.0, np.abs(want).max())


def test_fused_attention_matches_explicit(unet):
    cfg, model, tree = unet
    fused = torch_model.build(cfg, fused=True)
    ADAPTER.load_canonical(fused, tree)
    batch = random_batch(cfg)
    args = (batch["noise"], batch["timesteps"], batch["context"])
    assert max_abs(_denoise(fused.eval(), *args), _denoise(model, *args)) <= OUTPUT_ATOL


def test_bfloat16_forward_and_backward():
    model = torch_model.build(TINY)
    randomized(model, seed=5)
    batch = {k: torch.from_numpy(v) for k, v in random_batch(TINY).items()}
    want = model(batch)
    model.to(torch.bfloat16).train()
    got = model(batch)
    got["loss"].backward()
    assert got["prediction"].dtype == torch.float32 and got["loss"].dtype == torch.float32
    # bf16 keeps 8 mantissa bits: a few percent of the float32 values.
    error = (got["prediction"] - want["prediction"]).detach().norm()
    assert float(error / want["prediction"].detach().norm()) < 0.05
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_every_weight_gets_a_gradient():
    model = torch_model.build(TINY)
    randomized(model, seed=6)
    model.train()
    model({k: torch.from_numpy(v) for k, v in random_batch(TINY).items()})["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- conv blocks --------------------------------------------------------------------------------


def test_timestep_sinusoid_puts_cosines_first():
    t = torch.tensor([0, 7, 999])
    got = timestep_sinusoid(t, 8).numpy()
    freqs = np.exp(-math.log(10000.0) * np.arange(4) / 4)
    args = np.array([0, 7, 999])[:, None] * freqs[None]
    assert got.dtype == np.float32
    assert np.abs(got - np.concatenate([np.cos(args), np.sin(args)], -1)).max() <= 2e-4


def test_downsample_and_upsample_layouts():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    down = Downsample(3).double()
    want = F.conv2d(F.pad(x, (1, 1, 1, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert down(x).shape == (2, 3, 3, 3) and torch.allclose(down(x), want, atol=1e-12)
    up = Upsample(3).double()
    repeated = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (B, C, 2H, 2W)
    assert torch.allclose(up(x), up.conv(repeated), atol=1e-12)


# --- the shared layers' cross-attention -------------------------------------------------------


def test_cross_attention_matches_formula():
    torch.manual_seed(0)
    d, n, c, t, s = 8, 2, 5, 6, 4  # width, heads, context width, query and context tokens
    spec = AttentionSpec(d, n, bias=False, out_bias=True, context_dim=c)
    attn = Attention(spec).double()
    x, ctx = torch.randn(3, t, d, dtype=torch.float64), torch.randn(3, s, c, dtype=torch.float64)
    assert sorted(attn.state_dict()) == [
        "k_proj.weight",
        "o_proj.bias",
        "o_proj.weight",
        "q_proj.weight",
        "v_proj.weight",
    ]
    assert attn.k_proj.weight.shape == (d, c)
    q = (x @ attn.q_proj.weight.T).view(3, t, n, d // n).transpose(1, 2)  # (B, N, T, H)
    k = (ctx @ attn.k_proj.weight.T).view(3, s, n, d // n).transpose(1, 2)  # (B, N, S, H)
    v = (ctx @ attn.v_proj.weight.T).view(3, s, n, d // n).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // n), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(3, t, d)
    want = out @ attn.o_proj.weight.T + attn.o_proj.bias
    with torch.no_grad():
        assert (attn(x, context=ctx) - want).abs().max() <= 1e-12
        fused = Attention(dataclasses.replace(spec, fused=True)).double()
        fused.load_state_dict(attn.state_dict())
        assert (fused(x, context=ctx) - want).abs().max() <= 1e-12


def test_cross_attention_block_adds_a_pre_norm_branch():
    attention = AttentionSpec(8, 2)
    spec = BlockSpec(attention, MlpSpec(8, 16), norm_eps=1e-5, norm_position="pre")
    block = TransformerBlock(dataclasses.replace(spec, cross_attention=attention.cross(5)))
    names = set(block.state_dict())
    assert {"cross_attention_norm.weight", "cross_attention.k_proj.weight"} <= names
    assert block.cross_attention.k_proj.weight.shape == (8, 5)
    plain = TransformerBlock(spec)
    assert not any("cross" in k for k in plain.state_dict())
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 4, 5)
    with torch.no_grad():
        h = x + block.attention(block.attention_norm(x))
        h = h + block.cross_attention(block.cross_attention_norm(h), context=ctx)
        want = h + block.mlp(block.mlp_norm(h))
        assert torch.equal(block(x, context=ctx), want)
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, context=ctx)


def test_cross_attention_refuses_what_it_does_not_support():
    for kwargs in (dict(causal=True), dict(rotary_dim=2), dict(fused_qkv=True)):
        with pytest.raises(ValueError, match="cross-attention"):
            AttentionSpec(8, 2, context_dim=4, **kwargs)
    attention = AttentionSpec(8, 2)
    with pytest.raises(ValueError, match="norm_position 'pre'"):
        BlockSpec(
            attention,
            MlpSpec(8, 16),
            norm_eps=1e-5,
            norm_position="post",
            cross_attention=attention.cross(4),
        )
    with pytest.raises(ValueError, match="context"):
        Attention(attention.cross(4))(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="context"):
        Attention(attention)(torch.randn(1, 3, 8), context=torch.randn(1, 2, 8))

"""Flax NNX convolutional blocks of a diffusion UNet (same class, attribute and argument names as
``layers/torch/conv.py`` and ``layers/tf/conv.py``), in NHWC.

Residual blocks with a timestep embedding and spatial transformers as in the latent-diffusion
UNet (Rombach et al. 2022, https://arxiv.org/abs/2112.10752; Ho et al. 2020,
https://arxiv.org/abs/2006.11239), sinusoidal timestep features as in Vaswani et al. 2017
(https://arxiv.org/abs/1706.03762). Every padding, GroupNorm epsilon and group count is explicit:
the frameworks' defaults differ ("SAME" padding of a stride-2 conv pads bottom/right only, where
PyTorch pads one pixel on every side). Letters: B batch, H/W height/width, C channels, E timestep
embedding width, L context tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mlperf_tutor.layers.jax.block import TransformerBlock
from mlperf_tutor.layers.spec import BlockSpec

PAD1 = ((1, 1), (1, 1))  # one pixel on every side, as PyTorch's padding=1


def conv3x3(n_in: int, n_out: int, *, stride: int = 1, rngs: nnx.Rngs) -> nnx.Conv:
    """A 3x3 convolution padded by one pixel on every side (NHWC, kernel HWIO)."""
    return nnx.Conv(n_in, n_out, (3, 3), strides=stride, padding=PAD1, rngs=rngs)


def group_norm(ch: int, groups: int, eps: float, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm over the last (channel) axis with PyTorch's two-pass variance."""
    return nnx.GroupNorm(
        num_features=ch, num_groups=groups, epsilon=eps, use_fast_variance=False, rngs=rngs
    )


def timestep_sinusoid(timesteps: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of integer timesteps, cosines first, in float32.

    ``freqs = exp(-ln(10000) * arange(dim / 2) / (dim / 2))``; returns
    ``concat([cos(t * freqs), sin(t * freqs)])``, (B, dim).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)  # (dim/2,)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]  # (B, dim/2)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # (B, dim)


class TimestepEmbedding(nnx.Module):
    """``linear_2(silu(linear_1(x)))``: timestep features (B, n_in) to the embedding (B, E)."""

    def __init__(self, n_in: int, dim: int, *, rngs: nnx.Rngs):
        self.linear_1 = nnx.Linear(n_in, dim, rngs=rngs)
        self.linear_2 = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock(nnx.Module):
    """Residual block with a per-channel timestep shift::

        h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))
        out = shortcut(x) + conv2(silu(norm2(h)))

    Args:
        n_in, n_out: input and output channels; a 1x1 ``conv_shortcut`` when they differ.
        time_dim: width E of the timestep embedding.
        groups: GroupNorm groups.
        eps: GroupNorm epsilon.
        rngs: initialisers' keys.
    """

    def __init__(
        self, n_in: int, n_out: int, time_dim: int, *, groups: int, eps: float, rngs: nnx.Rngs
    ):
        self.norm1 = group_norm(n_in, groups, eps, rngs=rngs)
        self.conv1 = conv3x3(n_in, n_out, rngs=rngs)
        self.time_emb_proj = nnx.Linear(time_dim, n_out, rngs=rngs)
        self.norm2 = group_norm(n_out, groups, eps, rngs=rngs)
        self.conv2 = conv3x3(n_out, n_out, rngs=rngs)
        self.conv_shortcut = (
            nnx.Conv(n_in, n_out, (1, 1), padding=((0, 0), (0, 0)), rngs=rngs)
            if n_in != n_out
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))  # (B, H, W, C_out)
        h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]  # temb (B, E)
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h  # (B, H, W, C_out)


class SpatialTransformer(nnx.Module):
    """Transformer over the pixels of a feature map, with cross-attention on a context::

        h = proj_in(tokens(norm(x)))         # (B, H W, C), row-major pixels
        h = transformer_blocks(h, context)   # self-attention, cross-attention, GEGLU MLP
        out = x + spatial(proj_out(h))

    Args:
        spec: the transformer blocks (``cfg.block_spec(channels)``); their width is the
            channels C.
        depth: number of transformer blocks.
        groups: GroupNorm groups.
        norm_eps: the GroupNorm's epsilon.
        rngs: initialisers' keys.
    """

    def __init__(
        self, spec: BlockSpec, *, depth: int, groups: int, norm_eps: float, rngs: nnx.Rngs
    ):
        ch = spec.dim
        self.norm = group_norm(ch, groups, norm_eps, rngs=rngs)
        self.proj_in = nnx.Linear(ch, ch, rngs=rngs)
        self.transformer_blocks = nnx.List(TransformerBlock(spec, rngs=rngs) for _ in range(depth))
        self.proj_out = nnx.Linear(ch, ch, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, height, width, c = x.shape  # (B, H, W, C)
        h = self.proj_in(self.norm(x).reshape(b, height * width, c))  # (B, H W, C)
        for block in self.transformer_blocks:
            h = block(h, context=context)  # context (B, L, context_dim)
        return x + self.proj_out(h).reshape(b, height, width, c)


class Downsample(nnx.Module):
    """A 3x3 stride-2 convolution padded by one pixel on every side: (B, H, W, C) to
    (B, H/2, W/2, C)."""

    def __init__(self, ch: int, *, rngs: nnx.Rngs):
        self.conv = conv3x3(ch, ch, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest x2 (each pixel to a 2x2 square), then a 3x3 convolution: (B, H, W, C) to
    (B, 2H, 2W, C)."""

    def __init__(self, ch: int, *, rngs: nnx.Rngs):
        self.conv = conv3x3(ch, ch, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))

"""PyTorch building blocks of convolutional diffusion UNets (Stable Diffusion v2).

Latent diffusion: Rombach et al. 2022 (https://arxiv.org/abs/2112.10752); residual blocks with a
timestep projection as in DDPM (Ho et al. 2020, https://arxiv.org/abs/2006.11239); the spatial
transformer wraps the shared :class:`~mlperf_tutor.layers.torch.block.TransformerBlock` with
text cross-attention. Attribute names follow diffusers' ``UNet2DConditionModel`` and equal those
of ``layers/jax/conv.py`` and ``layers/tf/conv.py``. Layout NCHW; letters: B batch, C channels,
H/W spatial, T = H W tokens, L context tokens, E timestep-embedding width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlperf_tutor.layers.spec import BlockSpec
from mlperf_tutor.layers.torch.block import TransformerBlock


def timestep_sinusoid(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep features, cosines first: ``[cos(t f), sin(t f)]`` with
    ``f_j = exp(-ln(10000) j / (dim / 2))``, computed in float32.

    Args:
        timesteps: (B,) integer (or float) diffusion steps.
        dim: output width (even).

    Returns:
        (B, dim) float32.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(exponent / half).to(timesteps.device)  # (dim/2,)
    args = timesteps.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(x)))``: sinusoid features (B, C0) -> embedding (B, E)."""

    def __init__(self, n_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(n_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """Residual block with a timestep projection::

        h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))[:, :, None, None]
        out = shortcut(x) + conv2(silu(norm2(h)))

    ``shortcut`` is ``conv_shortcut`` (1x1) when the width changes, else the identity.

    Args:
        n_in, n_out: input and output channels.
        time_dim: width E of the timestep embedding.
        groups: GroupNorm groups.
        eps: GroupNorm epsilon.
    """

    def __init__(self, n_in: int, n_out: int, *, time_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, n_in, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(n_in, n_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, n_out)
        self.norm2 = nn.GroupNorm(groups, n_out, eps=eps, affine=True)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x (B, C_in, H, W), temb (B, E) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map, with cross-attention to a context::

        tokens = proj_in(norm(x) as (B, H W, C))     # row-major (h, w) order
        tokens = transformer_blocks(tokens, context)
        out = x + proj_out(tokens) as (B, C, H, W)

    Each block is a :class:`TransformerBlock` of ``spec`` (Stable Diffusion's: pre-LayerNorm,
    bias-free q/k/v projections with an ``o_proj`` bias, a cross-attention and a GEGLU MLP of
    width 4 C; ``cfg.block_spec(C)``).

    Args:
        spec: the blocks' spec; its width is the channels C.
        depth: transformer blocks.
        groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon at the input.
    """

    def __init__(self, spec: BlockSpec, *, depth: int, groups: int, norm_eps: float):
        super().__init__()
        ch = spec.dim
        self.norm = nn.GroupNorm(groups, ch, eps=norm_eps, affine=True)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(spec) for _ in range(depth)])
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W), context (B, L, context_dim)
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, T, C)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        tokens = self.proj_out(tokens)  # (B, T, C)
        return x + tokens.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Halves H and W: a 3x3 conv with stride 2 and one pixel of zero padding on every side."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour x2 (each pixel repeated 2x2), then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

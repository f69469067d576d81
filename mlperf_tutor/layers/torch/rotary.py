"""Rotary position embedding in PyTorch: Su et al. 2021, RoFormer
(https://arxiv.org/abs/2104.09864), as GPT-J and Llama 2 use it."""

from __future__ import annotations

import torch

from mlperf_tutor.layers.spec import check_rotary


def apply_rotary(
    x: torch.Tensor, rotary_dim: int, base: float = 10000.0, layout: str = "interleaved"
) -> torch.Tensor:
    """Rotates the first ``rotary_dim`` dims of every head at positions t = 0..T-1; pair j turns
    by ``t * base**(-2j / rotary_dim)``. The other dims pass through unchanged.

    Args:
        x: (B, T, heads, H) queries or keys.
        rotary_dim: even number R of dims rotated, at most H.
        base: the wavelength base (10000 in RoFormer, GPT-J and Llama 2).
        layout: which dims form pair j: "interleaved" (2j, 2j + 1) as GPT-J, or "half"
            (j, j + R / 2) as GPT-NeoX and Llama.

    Returns:
        (B, T, heads, H) in ``x``'s dtype; the angles are computed in float32 at least
        (float64 for float64 inputs).
    """
    check_rotary(rotary_dim, x.shape[-1], layout)
    dtype = torch.promote_types(x.dtype, torch.float32)
    exponent = torch.arange(0, rotary_dim, 2, dtype=dtype, device=x.device) / rotary_dim
    inv_freq = 1.0 / base**exponent  # (R/2,)
    angle = torch.arange(x.shape[1], dtype=dtype, device=x.device)[:, None] * inv_freq  # (T, R/2)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # (T, 1, R/2)
    rot = x[..., :rotary_dim].to(dtype)  # (B, T, heads, R)
    if layout == "interleaved":
        a, b = rot[..., 0::2], rot[..., 1::2]  # (B, T, heads, R/2)
        rot = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = rot.chunk(2, dim=-1)  # (B, T, heads, R/2)
        rot = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rotary_dim:]), dim=-1)

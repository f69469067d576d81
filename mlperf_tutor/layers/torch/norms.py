"""PyTorch norms: Llama's RMSNorm, and the LayerNorm or RMSNorm that a :class:`BlockSpec` names.

RMSNorm: Zhang & Sennrich 2019 (https://arxiv.org/abs/1910.07467), with the rounding of Llama 2
(Touvron et al. 2023, https://arxiv.org/abs/2307.09288).
"""

from __future__ import annotations

import torch
from torch import nn

from mlperf_tutor.layers.spec import check_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm as Llama computes it: in float32 at least,
    ``x / sqrt(mean(x**2) + eps)``, cast back to the input dtype, times ``weight``.

    Args:
        dim: normalised (last) dimension D.
        eps: added to the mean square (always explicit: 1e-5 in Llama 2).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """A LayerNorm with weight and bias ("layernorm") or an :class:`RMSNorm` ("rmsnorm")."""
    check_norm(kind)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=True, bias=True)
    return RMSNorm(dim, eps)

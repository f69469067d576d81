"""The transformer's feed-forward network in PyTorch, as an :class:`MlpSpec` describes it.

SwiGLU: Shazeer 2020 (https://arxiv.org/abs/2002.05202), as Llama 2 uses it; GEGLU as Stable
Diffusion's transformer blocks use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mlperf_tutor.layers.spec import MlpSpec, check_activation

# Activation name -> function, every approximation explicit (never a framework default).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x, approximate="none"),  # exact, with erf (BERT)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2 / GPT-3 / GPT-J
    "relu": F.relu,
    "silu": F.silu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called ``name`` (a key of :data:`ACTIVATIONS`)."""
    check_activation(name)
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """``fc_out(dropout(act(fc_in(x))))``, or gated ``fc_out(dropout(act(fc_gate(x)) *
    fc_in(x)))``: x (..., D) -> (..., D) through an inner width F (see :class:`MlpSpec`).

    Args:
        spec: the widths, activation, biases, dropout and gating.
    """

    def __init__(self, spec: MlpSpec):
        super().__init__()
        if not isinstance(spec, MlpSpec):
            raise TypeError(f"MLP takes an MlpSpec, got {type(spec).__name__}")
        self.spec = spec
        self.fc_gate = nn.Linear(spec.dim, spec.hidden, bias=spec.bias) if spec.gated else None
        self.fc_in = nn.Linear(spec.dim, spec.hidden, bias=spec.bias)
        self.fc_out = nn.Linear(spec.hidden, spec.dim, bias=spec.bias)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = get_activation(self.spec.activation)
        if self.fc_gate is None:
            hidden = act(self.fc_in(x))  # (..., F)
        else:
            hidden = act(self.fc_gate(x)) * self.fc_in(x)  # (..., F)
        return self.fc_out(self.dropout(hidden))  # (..., D)

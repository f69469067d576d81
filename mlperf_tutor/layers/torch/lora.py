"""LoRA adapters in PyTorch (Hu et al. 2021, https://arxiv.org/abs/2106.09685), as
:class:`~mlperf_tutor.layers.spec.Lora` specifies them."""

from __future__ import annotations

import torch
from torch import nn

from mlperf_tutor.layers.spec import Lora


class LoRALinear(nn.Linear):
    """A Linear layer plus a LoRA adapter: ``linear(x) + scaling * lora_b(lora_a(dropout(x)))``.

    The base ``weight`` and ``bias`` keep the Linear's names; freezing them is the model's
    business (see ``set_trainable`` of the framework adapters).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        lora: the adapter's rank, alpha and dropout.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, lora: Lora):
        super().__init__(in_features, out_features, bias=bias)
        self.scaling = lora.scaling
        self.lora_a = nn.Linear(in_features, lora.rank, bias=False)
        self.lora_b = nn.Linear(lora.rank, out_features, bias=False)
        self.lora_dropout = nn.Dropout(lora.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_b(self.lora_a(self.lora_dropout(x)))  # (..., out)
        return super().forward(x) + self.scaling * update


def make_linear(name: str, n_in: int, n_out: int, *, bias: bool, lora: Lora | None) -> nn.Linear:
    """``nn.Linear``, or :class:`LoRALinear` when ``lora`` targets the attribute ``name``."""
    if lora is not None and lora.applies_to(name):
        return LoRALinear(n_in, n_out, bias=bias, lora=lora)
    return nn.Linear(n_in, n_out, bias=bias)

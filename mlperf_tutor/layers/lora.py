"""LoRA adapters, framework-free part: what gets an adapter and how adapter names look.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) adds a trainable low-rank update to a
frozen linear layer, as PEFT's ``LoraLayer`` computes it::

    y = W x + b + (alpha / r) * lora_b(lora_a(dropout(x)))        lora_a: (r, in), lora_b: (out, r)

Each framework's ``LoRALinear`` (``torch_layers``, ``jax_layers``, ``tf_layers``) is its
``Linear`` plus the two children ``lora_a`` and ``lora_b``, so the base weight keeps its plain
canonical name (``...qkv_proj.weight``) and the adapters are ``...qkv_proj.lora_a.weight`` and
``...qkv_proj.lora_b.weight``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Lora:
    """Which linear layers get adapters, and the adapters' numbers.

    Args:
        rank: r, the inner width of the update.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout rate on the adapter's input (not on the base layer's).
        targets: attribute names of the layers that get adapters, e.g. ("qkv_proj", "o_proj").
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv_proj", "o_proj")

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def applies_to(self, name: str) -> bool:
        return name in self.targets


def is_adapter(name: str) -> bool:
    """Whether a canonical parameter name belongs to a LoRA adapter (the only trained ones)."""
    return ".lora_a." in name or ".lora_b." in name

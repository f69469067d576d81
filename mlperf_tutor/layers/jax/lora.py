"""LoRA adapters on Flax NNX linear layers, as :class:`mlperf_tutor.layers.spec.Lora` specifies
(Hu et al. 2021, https://arxiv.org/abs/2106.09685)."""

from __future__ import annotations

import jax
from flax import nnx

from mlperf_tutor.layers.spec import Lora


class LoRALinear(nnx.Linear):
    """A Linear layer plus a LoRA adapter: ``linear(x) + scaling * lora_b(lora_a(dropout(x)))``.

    The base ``kernel`` and ``bias`` keep the Linear's names (and its layout rule); freezing
    them is the model's business (``mlperf_tutor.frameworks.jax.set_trainable``).

    Args:
        in_features, out_features: as ``nnx.Linear``.
        bias: whether the base layer has a bias (the adapters have none).
        lora: the adapter's rank, alpha and dropout (train mode only).
        rngs: initialisers' keys and the dropout stream.
    """

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, lora: Lora, rngs: nnx.Rngs
    ):
        super().__init__(in_features, out_features, use_bias=bias, rngs=rngs)
        self.scaling = lora.scaling
        self.lora_a = nnx.Linear(in_features, lora.rank, use_bias=False, rngs=rngs)
        self.lora_b = nnx.Linear(lora.rank, out_features, use_bias=False, rngs=rngs)
        self.lora_dropout = nnx.Dropout(lora.dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        update = self.lora_b(self.lora_a(self.lora_dropout(x)))  # (..., out)
        return super().__call__(x) + self.scaling * update


def make_linear(
    name: str, n_in: int, n_out: int, *, bias: bool, lora: Lora | None, rngs: nnx.Rngs
) -> nnx.Linear:
    """``nnx.Linear``, or :class:`LoRALinear` when ``lora`` targets the attribute ``name``."""
    if lora is not None and lora.applies_to(name):
        return LoRALinear(n_in, n_out, bias=bias, lora=lora, rngs=rngs)
    return nnx.Linear(n_in, n_out, use_bias=bias, rngs=rngs)

"""The transformer MLP in Flax NNX, built from an :class:`~mlperf_tutor.layers.spec.MlpSpec`.

Gated variants: SwiGLU and GEGLU (Shazeer 2020, https://arxiv.org/abs/2002.05202), as Llama 2
and Stable Diffusion use them. Dimension letters: D model, F inner width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx

from mlperf_tutor.layers.spec import MlpSpec, check_activation

# Explicit approximations: jax.nn.gelu defaults to the tanh form, PyTorch's to the exact one.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` ("gelu" is exact, "gelu_tanh" approximate)."""
    check_activation(name)
    return ACTIVATIONS[name]


class MLP(nnx.Module):
    """Feed-forward network (B, T, D) -> (B, T, D): ``fc_out(dropout(act(fc_in(x))))``, or
    gated ``fc_out(dropout(act(fc_gate(x)) * fc_in(x)))``; see
    :class:`~mlperf_tutor.layers.spec.MlpSpec` for the fields.

    Args:
        spec: the MLP.
        rngs: initialisers' keys and the dropout stream (dropout in train mode only).
    """

    def __init__(self, spec: MlpSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        linear = functools.partial(nnx.Linear, use_bias=spec.bias, rngs=rngs)
        self.fc_gate = linear(spec.dim, spec.hidden) if spec.gated else None
        self.fc_in = linear(spec.dim, spec.hidden)
        self.fc_out = linear(spec.hidden, spec.dim)
        self.dropout = nnx.Dropout(spec.dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.spec.activation)
        if self.fc_gate is None:
            hidden = act(self.fc_in(x))  # (..., F)
        else:
            hidden = act(self.fc_gate(x)) * self.fc_in(x)  # (..., F)
        return self.fc_out(self.dropout(hidden))  # (..., D)

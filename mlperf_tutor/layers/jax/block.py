"""The transformer block in Flax NNX, built from a :class:`~mlperf_tutor.layers.spec.BlockSpec`.

Post-LN as in BERT (https://arxiv.org/abs/1810.04805), pre-LN as in GPT-2, parallel as in GPT-J
(Wang & Komatsuzaki 2021, https://github.com/kingoflolz/mesh-transformer-jax), pre-RMSNorm with a
SwiGLU MLP as in Llama 2 (Touvron et al. 2023, https://arxiv.org/abs/2307.09288), with a
cross-attention as in Stable Diffusion's spatial transformers. Dimension letters: B batch,
T time, S context tokens, D model.
"""

from __future__ import annotations

import jax
from flax import nnx

from mlperf_tutor.layers.jax.attention import Attention
from mlperf_tutor.layers.jax.mlp import MLP
from mlperf_tutor.layers.jax.norms import make_norm
from mlperf_tutor.layers.spec import BlockSpec


class TransformerBlock(nnx.Module):
    """Self-attention (then cross-attention, when ``spec.cross_attention``) and MLP, each in a
    residual branch with a norm and dropout, (B, T, D) -> (B, T, D); the order of the norms
    (``spec.norm_position``) is drawn in :class:`~mlperf_tutor.layers.spec.BlockSpec`.

    Args:
        spec: the block.
        rngs: initialisers' keys and the dropout streams (dropout in train mode only).
    """

    def __init__(self, spec: BlockSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        d, eps = spec.dim, spec.norm_eps
        self.attention = Attention(spec.attention, rngs=rngs)
        self.attention_norm = make_norm(spec.norm, d, eps, rngs=rngs)
        cross = spec.cross_attention is not None
        self.cross_attention = Attention(spec.cross_attention, rngs=rngs) if cross else None
        self.cross_attention_norm = make_norm(spec.norm, d, eps, rngs=rngs) if cross else None
        self.mlp = MLP(spec.mlp, rngs=rngs)
        if spec.norm_position != "parallel":  # the parallel block's MLP reads attention_norm's
            self.mlp_norm = make_norm(spec.norm, d, eps, rngs=rngs)
        self.dropout = nnx.Dropout(spec.dropout, rngs=rngs)

    def __call__(
        self, x: jax.Array, key_mask: jax.Array | None = None, context: jax.Array | None = None
    ) -> jax.Array:
        if context is not None and self.cross_attention is None:
            raise ValueError(
                "a context needs a block whose spec has a cross_attention "
                "(AttentionSpec.cross(context_dim))"
            )
        position = self.spec.norm_position
        if position == "parallel":
            h = self.attention_norm(x)
            return x + self.dropout(self.attention(h, key_mask)) + self.dropout(self.mlp(h))
        if position == "post":
            x = self.attention_norm(x + self.dropout(self.attention(x, key_mask)))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))  # (B, T, D)
        x = x + self.dropout(self.attention(self.attention_norm(x), key_mask))
        if self.cross_attention is not None:  # its Attention refuses a missing context
            h = self.cross_attention_norm(x)
            x = x + self.dropout(self.cross_attention(h, context=context))  # context (B, S, ·)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))  # (B, T, D)

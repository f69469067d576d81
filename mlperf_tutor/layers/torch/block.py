"""The transformer block in PyTorch, as a :class:`BlockSpec` describes it.

Post-LN blocks as in BERT (mlcommons/training ``language_model/tensorflow/bert/modeling.py``),
pre-LN as in GPT-2 and Stable Diffusion, parallel as in GPT-J (Wang & Komatsuzaki 2021,
https://github.com/kingoflolz/mesh-transformer-jax), pre-RMSNorm with a SwiGLU MLP as in Llama 2
(Touvron et al. 2023, https://arxiv.org/abs/2307.09288).
"""

from __future__ import annotations

import torch
from torch import nn

from mlperf_tutor.layers.spec import BlockSpec
from mlperf_tutor.layers.torch.attention import Attention
from mlperf_tutor.layers.torch.mlp import MLP
from mlperf_tutor.layers.torch.norms import make_norm


class TransformerBlock(nn.Module):
    """Self-attention (and a cross-attention to a ``context``), then an MLP, each in a residual
    branch with a norm placed as ``spec.norm_position`` says: x (B, T, D) -> (B, T, D). The
    formulas are :class:`BlockSpec`'s.

    Args:
        spec: the attentions, the MLP, the norms and the residual dropout.
    """

    def __init__(self, spec: BlockSpec):
        super().__init__()
        if not isinstance(spec, BlockSpec):
            raise TypeError(
                f"TransformerBlock takes a BlockSpec (e.g. cfg.block_spec()), got "
                f"{type(spec).__name__}"
            )
        self.spec = spec
        self.attention = Attention(spec.attention)
        self.attention_norm = make_norm(spec.norm, spec.dim, spec.norm_eps)
        self.cross_attention = None
        if spec.cross_attention is not None:
            self.cross_attention = Attention(spec.cross_attention)
            self.cross_attention_norm = make_norm(spec.norm, spec.dim, spec.norm_eps)
        self.mlp = MLP(spec.mlp)
        if spec.norm_position != "parallel":  # the parallel block's MLP reads attention_norm's
            self.mlp_norm = make_norm(spec.norm, spec.dim, spec.norm_eps)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x (B, T, D) in and out; context (B, S, context_dim) for the cross-attention
        if context is not None and self.cross_attention is None:
            raise ValueError(
                "this TransformerBlock has no cross-attention (its BlockSpec.cross_attention is "
                "None), so it takes no context"
            )
        position = self.spec.norm_position
        if position == "parallel":
            h = self.attention_norm(x)
            return x + self.dropout(self.attention(h, key_mask)) + self.dropout(self.mlp(h))
        if position == "pre":
            x = x + self.dropout(self.attention(self.attention_norm(x), key_mask))
            if self.cross_attention is not None:  # its Attention refuses a missing context
                h = self.cross_attention(self.cross_attention_norm(x), context=context)
                x = x + self.dropout(h)
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attention_norm(x + self.dropout(self.attention(x, key_mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))

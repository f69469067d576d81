"""Multi-head attention in PyTorch, as an :class:`AttentionSpec` describes it.

Attention: Vaswani et al. 2017 (https://arxiv.org/abs/1706.03762); grouped-query attention:
Ainslie et al. 2023 (https://arxiv.org/abs/2305.13245); rotary positions (GPT-J, Llama 2) from
``rotary.py``; the key-padding mask value of the MLPerf BERT reference (mlcommons/training
``language_model/tensorflow/bert/modeling.py``). Attribute names equal those of ``layers/jax``
and ``layers/tf``, so the adapters' generic layout rules map every leaf.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from mlperf_tutor.layers.spec import CAUSAL_MASK_VALUE, KEY_MASK_VALUE, AttentionSpec
from mlperf_tutor.layers.torch.lora import LoRALinear, make_linear
from mlperf_tutor.layers.torch.rotary import apply_rotary


def masked_scores(
    scores: torch.Tensor, key_mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """``scores`` (B, N, T, S) or (B, 1, T, S) with padded keys and, when ``causal``, future
    keys masked.

    Args:
        scores: float32 or float64 attention scores.
        key_mask: (B, S), 1 for a real key and 0 for padding; None: no padding.
        causal: set the scores of keys after the query to ``CAUSAL_MASK_VALUE``.
    """
    if key_mask is not None:
        pad = 1.0 - key_mask.to(scores.dtype)  # (B, S): 1 where the key is padding
        scores = scores + pad[:, None, None, :] * KEY_MASK_VALUE
    if causal:
        t, s = scores.shape[-2:]
        future = torch.ones(t, s, dtype=torch.bool, device=scores.device).triu(1)  # (T, S)
        scores = scores.masked_fill(future, CAUSAL_MASK_VALUE)
    return scores


class Attention(nn.Module):
    """Multi-head attention: x (B, T, D) -> (B, T, D), keys and values from ``x`` itself or,
    for a cross-attention (``spec.context_dim``), from a ``context`` (B, S, context_dim).

    ``q k^T / sqrt(H)`` with padded and future keys masked, softmax in float32 at least (float64
    for float64 models), dropout on the probabilities, the weighted values through ``o_proj``;
    see :class:`AttentionSpec`. With ``spec.fused`` the core runs in
    ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU): same math,
    but its dropout draws other random numbers and its softmax runs in the input dtype.

    Args:
        spec: the widths, heads, biases, masks, rotary positions, LoRA and kernel choice.
    """

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"Attention takes an AttentionSpec, got {type(spec).__name__}")
        self.spec = spec
        dim, kv_dim = spec.dim, spec.kv_heads * spec.head_dim
        kv_in = dim if spec.context_dim is None else spec.context_dim
        bias, lora = spec.bias, spec.lora
        if spec.fused_qkv:
            self.qkv_proj = make_linear("qkv_proj", dim, dim + 2 * kv_dim, bias=bias, lora=lora)
        else:
            self.q_proj = make_linear("q_proj", dim, dim, bias=bias, lora=lora)
            self.k_proj = make_linear("k_proj", kv_in, kv_dim, bias=bias, lora=lora)
            self.v_proj = make_linear("v_proj", kv_in, kv_dim, bias=bias, lora=lora)
        self.o_proj = make_linear("o_proj", dim, dim, bias=spec.has_out_bias, lora=lora)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x (B, T, D); context (B, S, context_dim) for cross-attention; key_mask (B, S)
        spec = self.spec
        if (context is None) != (spec.context_dim is None):
            raise ValueError(
                f"Attention(context_dim={spec.context_dim}) needs a context exactly when "
                "context_dim is set"
            )
        b, t, _ = x.shape
        if not spec.is_cross:
            spec.check_length(t)
        q, k, v = self._project(x, x if context is None else context)
        s = k.shape[1]
        # Head counts from the widths (-1), not the spec: under tensor parallelism
        # (mlperf_tutor.parallel.torch) each device projects only its share of the heads.
        q = q.view(b, t, -1, spec.head_dim)  # (B, T, N, H)
        k = k.view(b, s, -1, spec.head_dim)  # (B, S, K, H)
        v = v.view(b, s, -1, spec.head_dim)  # (B, S, K, H)
        if spec.rotary_dim:
            q = apply_rotary(q, spec.rotary_dim, spec.rotary_base, spec.rotary_layout)
            k = apply_rotary(k, spec.rotary_dim, spec.rotary_base, spec.rotary_layout)
        if spec.fused:
            out = self._fused(q, k, v, key_mask)  # (B, T, N, H)
        else:
            group = q.shape[2] // k.shape[2]
            # Each kv head serves `group` consecutive query heads: (B, S, K, H) -> (B, S, N, H).
            k = k.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
            scores = torch.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(spec.head_dim)
            # Softmax in float32 at least (bf16 scores lose the -10000 mask's precision);
            # float64 models, as in gradient checks, stay float64.
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
            probs = torch.softmax(masked_scores(scores, key_mask, spec.causal), dim=-1)
            probs = self.dropout(probs.to(v.dtype))  # (B, N, T, S)
            out = torch.einsum("BNTS,BSNH->BTNH", probs, v)  # (B, T, N, H)
        return self.o_proj(out.reshape(b, t, q.shape[2] * spec.head_dim))  # (B, T, D)

    def _project(
        self, x: torch.Tensor, kv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (B, T, N H), (B, S, K H), (B, S, K H); kv is x itself for self-attention
        if self.spec.fused_qkv:
            kv_dim = self.spec.kv_heads * self.spec.head_dim
            q_dim = self.spec.num_heads * self.spec.head_dim
            return self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        return self.q_proj(x), self._keys(kv), self.v_proj(kv)

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        # Without rotary, the key bias adds q . b to every score of a query alike, which softmax
        # ignores: its gradient is exactly zero. Computed through the graph it is round-off
        # (~1e-12) that differs between frameworks and that Adam (eps 1e-8) amplifies into
        # visible drift, so the bias enters the keys as a constant: same forward, exact zero.
        # A tensor-parallel k_proj (DTensor weight) must go through its module: the parallel
        # style's hooks around its forward turn x into a DTensor and the output back.
        if (
            self.k_proj.bias is None
            or self.spec.rotary_dim
            or isinstance(self.k_proj, LoRALinear)
            or isinstance(self.k_proj.weight, DTensor)
        ):
            return self.k_proj(x)
        return F.linear(x, self.k_proj.weight) + self.k_proj.bias.detach()

    def _fused(self, q, k, v, key_mask):
        # F.scaled_dot_product_attention wants heads first: (B, N, T, H) and (B, K, S, H).
        spec = self.spec
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        bias = None
        if key_mask is not None:
            t, s = q.shape[2], k.shape[2]
            zeros = torch.zeros(q.shape[0], 1, t, s, dtype=torch.float32, device=q.device)
            # (B, 1, T, S), causal part included (SDPA takes a mask or is_causal, not both). In
            # bf16 the causal value becomes -inf, harmless: every row keeps its diagonal.
            bias = masked_scores(zeros, key_mask, spec.causal).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,
            dropout_p=self.dropout.p if self.training else 0.0,
            is_causal=spec.causal and bias is None,
            scale=1.0 / math.sqrt(spec.head_dim),
            enable_gqa=spec.kv_heads != spec.num_heads,
        )
        return out.transpose(1, 2)  # (B, T, N, H)

"""PyTorch building blocks that the transformer workloads share (BERT, GPT-3, GPT-J, Llama 2, SD).

Attention: Vaswani et al. 2017 (https://arxiv.org/abs/1706.03762); grouped-query attention:
Ainslie et al. 2023 (https://arxiv.org/abs/2305.13245); rotary positions: Su et al. 2021,
RoFormer (https://arxiv.org/abs/2104.09864). Post-LN blocks as in BERT (mlcommons/training
``language_model/tensorflow/bert/modeling.py``), pre-LN as in GPT-2, parallel as in GPT-J (Wang &
Komatsuzaki 2021, https://github.com/kingoflolz/mesh-transformer-jax), pre-RMSNorm with a SwiGLU
MLP as in Llama 2 (Touvron et al. 2023, https://arxiv.org/abs/2307.09288; SwiGLU: Shazeer 2020,
https://arxiv.org/abs/2002.05202), LoRA adapters as :mod:`mlperf_tutor.layers.lora` specifies.
Class, attribute and argument names equal those of ``jax_layers`` and ``tf_layers``, so the
adapters' generic layout rules map every leaf. Dimension letters: B batch, T query time, S key
time, D model, N heads, K kv heads, H head dim, F ffn.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mlperf_tutor.layers.spec import Lora

# Added to the scores of padded keys: the MLPerf BERT reference's value (modeling.py). It is
# not -inf so that a fully padded row still has a well-defined (uniform) softmax.
KEY_MASK_VALUE = -10000.0
# Put on the scores of future keys; the most negative float32, so exp() gives exactly 0 even
# where a padded key's -10000 was added before.
CAUSAL_MASK_VALUE = float(torch.finfo(torch.float32).min)

# Activation name -> function, every approximation explicit (never a framework default).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x, approximate="none"),  # exact, with erf (BERT)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2 / GPT-3 / GPT-J
    "relu": F.relu,
    "silu": F.silu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called ``name`` (a key of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


NORMS = ("layernorm", "rmsnorm")


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) as Llama computes it: in float32 at least,
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
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=True, bias=True)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


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


ROTARY_LAYOUTS = ("interleaved", "half")


def apply_rotary(
    x: torch.Tensor, rotary_dim: int, base: float = 10000.0, layout: str = "interleaved"
) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, RoFormer, https://arxiv.org/abs/2104.09864).

    Rotates the first ``rotary_dim`` dims of every head at positions t = 0..T-1; pair j turns by
    ``t * base**(-2j / rotary_dim)``. The other dims pass through unchanged.

    Args:
        x: (B, T, heads, H) queries or keys.
        rotary_dim: even number of dims rotated, at most H.
        base: the wavelength base (10000 in RoFormer, GPT-J and Llama 2).
        layout: which dims form pair j: "interleaved" (2j, 2j + 1) as GPT-J, or "half"
            (j, j + rotary_dim / 2) as GPT-NeoX and Llama.

    Returns:
        (B, T, heads, H) in ``x``'s dtype; the angles are computed in float32 at least
        (float64 for float64 inputs).
    """
    _check_rotary(rotary_dim, x.shape[-1], layout)
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


def _check_rotary(rotary_dim: int, head_dim: int, layout: str) -> None:
    if layout not in ROTARY_LAYOUTS:
        raise ValueError(f"rotary_layout must be one of {ROTARY_LAYOUTS}, got {layout!r}")
    if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim ({rotary_dim}) must be even and in [0, head dim {head_dim}]")


class Attention(nn.Module):
    """Multi-head attention with optional grouped-query heads, key padding and causality; self-
    attention, or cross-attention to a ``context`` when ``context_dim`` is set.

    ``scores = q k^T / sqrt(H)``; padded keys get ``-10000`` added (the MLPerf BERT reference's
    value), future keys are set to the most negative float32 when ``causal``; softmax in float32
    (float64 for float64 models), dropout on the probabilities, then the weighted values go
    through ``o_proj``. With ``num_kv_heads = K < N``, query head ``n`` uses key/value head
    ``n // (N / K)`` (Llama 2's layout of grouped heads). With ``rotary_dim > 0`` the queries
    and keys get :func:`apply_rotary` after the projections (GPT-J, Llama). With ``context_dim``
    the keys and values are projected from ``context`` (B, S, context_dim) instead of ``x``
    (the text cross-attention of Stable Diffusion's UNet).

    Args:
        dim: model width D (input and output).
        num_heads: query heads N; head dim H = D / N.
        num_kv_heads: key/value heads K (grouped-query attention); N when None.
        bias: whether the four projections have biases.
        dropout: dropout rate on the attention probabilities.
        causal: mask keys after the query (decoder self-attention).
        fused: use ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
            Same math, but its dropout draws different random numbers and its softmax runs in
            the input dtype; the default explicit path is the reference.
        rotary_dim: dims of each query and key head that rotary positions rotate; 0: none.
        rotary_base: the rotary wavelength base.
        rotary_layout: "interleaved" (GPT-J) or "half" (Llama) pairs; see :func:`apply_rotary`.
        fused_qkv: one ``qkv_proj`` whose output is the N H query dims, then the K H key and
            the K H value dims (the MLPerf Llama 2 checkpoint's layout), instead of three.
        lora: LoRA adapters on the projections it targets (``qkv_proj``, ``o_proj``, ...).
        context_dim: width of the ``context`` that keys and values read (cross-attention);
            None: self-attention. Not with causal, rotary or fused_qkv.
        out_bias: whether ``o_proj`` has a bias; None: ``bias``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        causal: bool = False,
        fused: bool = False,
        rotary_dim: int = 0,
        rotary_base: float = 10000.0,
        rotary_layout: str = "interleaved",
        fused_qkv: bool = False,
        lora: Lora | None = None,
        context_dim: int | None = None,
        out_bias: bool | None = None,
    ):
        super().__init__()
        if context_dim is not None and (causal or rotary_dim or fused_qkv):
            raise ValueError(
                "cross-attention (context_dim set) supports neither causal, rotary_dim nor "
                "fused_qkv; leave them at their defaults"
            )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"Attention needs dim ({dim}) divisible by num_heads ({num_heads}) and num_heads "
                f"divisible by num_kv_heads ({num_kv_heads})"
            )
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.causal, self.fused = causal, fused
        _check_rotary(rotary_dim, self.head_dim, rotary_layout)
        self.rotary_dim, self.rotary_base = rotary_dim, rotary_base
        self.rotary_layout = rotary_layout
        kv_dim = num_kv_heads * self.head_dim
        self.fused_qkv, self.context_dim = fused_qkv, context_dim
        kv_in = dim if context_dim is None else context_dim
        if fused_qkv:
            self.qkv_proj = make_linear("qkv_proj", dim, dim + 2 * kv_dim, bias=bias, lora=lora)
        else:
            self.q_proj = make_linear("q_proj", dim, dim, bias=bias, lora=lora)
            self.k_proj = make_linear("k_proj", kv_in, kv_dim, bias=bias, lora=lora)
            self.v_proj = make_linear("v_proj", kv_in, kv_dim, bias=bias, lora=lora)
        out_bias = bias if out_bias is None else out_bias
        self.o_proj = make_linear("o_proj", dim, dim, bias=out_bias, lora=lora)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x (B, T, D); context (B, S, context_dim) for cross-attention; key_mask (B, S)
        if (context is None) != (self.context_dim is None):
            raise ValueError(
                f"Attention(context_dim={self.context_dim}) needs a context exactly when "
                "context_dim is set"
            )
        b, t, _ = x.shape
        q, k, v = self._project(x, x if context is None else context)
        s = k.shape[1]
        q = q.view(b, t, self.num_heads, self.head_dim)  # (B, T, N, H)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)  # (B, S, K, H)
        v = v.view(b, s, self.num_kv_heads, self.head_dim)  # (B, S, K, H)
        if self.rotary_dim:
            q = apply_rotary(q, self.rotary_dim, self.rotary_base, self.rotary_layout)
            k = apply_rotary(k, self.rotary_dim, self.rotary_base, self.rotary_layout)
        if self.fused:
            out = self._fused(q, k, v, key_mask)  # (B, T, N, H)
        else:
            group = self.num_heads // self.num_kv_heads
            # Each kv head serves `group` consecutive query heads: (B, S, K, H) -> (B, S, N, H).
            k = k.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
            scores = torch.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(self.head_dim)
            # Softmax in float32 at least (bf16 scores lose the -10000 mask's precision);
            # float64 models, as in gradient checks, stay float64.
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
            probs = torch.softmax(self._masked(scores, key_mask), dim=-1)  # (B, N, T, S)
            probs = self.dropout(probs.to(v.dtype))
            out = torch.einsum("BNTS,BSNH->BTNH", probs, v)  # (B, T, N, H)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))  # (B, T, D)

    def _project(
        self, x: torch.Tensor, kv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (B, T, N H), (B, S, K H), (B, S, K H); kv is x itself for self-attention
        if self.fused_qkv:
            kv_dim = self.num_kv_heads * self.head_dim
            q_dim = self.num_heads * self.head_dim
            return self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        return self.q_proj(x), self._keys(kv), self.v_proj(kv)

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        # Without rotary, the key bias adds q . b to every score of a query alike, which softmax
        # ignores: its gradient is exactly zero. Computed through the graph it is round-off
        # (~1e-12) that differs between frameworks and that Adam (eps 1e-8) amplifies into
        # visible drift, so the bias enters the keys as a constant: same forward, exact zero.
        if self.k_proj.bias is None or self.rotary_dim or isinstance(self.k_proj, LoRALinear):
            return self.k_proj(x)
        return F.linear(x, self.k_proj.weight) + self.k_proj.bias.detach()

    def _masked(self, scores: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        # scores (B, N, T, S) or (B, 1, T, S), float32 or float64
        if key_mask is not None:
            pad = 1.0 - key_mask.to(scores.dtype)  # (B, S): 1 where the key is padding
            scores = scores + pad[:, None, None, :] * KEY_MASK_VALUE
        if self.causal:
            t, s = scores.shape[-2:]
            future = torch.ones(t, s, dtype=torch.bool, device=scores.device).triu(1)  # (T, S)
            scores = scores.masked_fill(future, CAUSAL_MASK_VALUE)
        return scores

    def _fused(self, q, k, v, key_mask):
        # F.scaled_dot_product_attention wants heads first: (B, N, T, H) and (B, K, S, H).
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        bias = None
        if key_mask is not None:
            t, s = q.shape[2], k.shape[2]
            zeros = torch.zeros(q.shape[0], 1, t, s, dtype=torch.float32, device=q.device)
            # (B, 1, T, S), causal part included (SDPA takes a mask or is_causal, not both). In
            # bf16 the causal value becomes -inf, harmless: every row keeps its diagonal.
            bias = self._masked(zeros, key_mask).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout.p if self.training else 0.0,
            is_causal=self.causal and bias is None, scale=1.0 / math.sqrt(self.head_dim),
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # fmt: skip
        return out.transpose(1, 2)  # (B, T, N, H)


class MLP(nn.Module):
    """Feed-forward network: ``fc_out(dropout(act(fc_in(x))))``, or with ``gated`` (SwiGLU with
    "silu", as Llama: ``gate_proj`` = ``fc_gate``, ``up_proj`` = ``fc_in``, ``down_proj`` =
    ``fc_out``) ``fc_out(dropout(act(fc_gate(x)) * fc_in(x)))``.

    Args:
        dim: model width D (input and output).
        hidden: inner width F.
        activation: one of "gelu" (exact, erf), "gelu_tanh", "relu", "silu".
        bias: whether both layers have biases.
        dropout: dropout rate on the inner activations (0 in BERT and GPT, whose blocks drop
            the MLP's output instead).
        gated: a third projection ``fc_gate`` whose activation multiplies ``fc_in(x)``.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        gated: bool = False,
    ):
        super().__init__()
        get_activation(activation)  # fail at construction on a bad name
        self.activation = activation
        self.fc_gate = nn.Linear(dim, hidden, bias=bias) if gated else None
        self.fc_in = nn.Linear(dim, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = get_activation(self.activation)
        if self.fc_gate is None:
            hidden = act(self.fc_in(x))  # (..., F)
        else:
            hidden = act(self.fc_gate(x)) * self.fc_in(x)  # (..., F)
        return self.fc_out(self.dropout(hidden))  # (..., D)


class TransformerBlock(nn.Module):
    """Self-attention + MLP, each in a residual branch with a LayerNorm (or RMSNorm).

    ``norm_position="post"`` (BERT)::

        x = attention_norm(x + dropout(attention(x, key_mask)))
        x = mlp_norm(x + dropout(mlp(x)))

    ``norm_position="pre"`` (GPT)::

        x = x + dropout(attention(attention_norm(x), key_mask))
        x = x + dropout(cross_attention(cross_attention_norm(x), context))  # with context_dim
        x = x + dropout(mlp(mlp_norm(x)))

    ``norm_position="parallel"`` (GPT-J; Wang & Komatsuzaki 2021,
    https://github.com/kingoflolz/mesh-transformer-jax), one norm and no ``mlp_norm``::

        h = attention_norm(x)
        x = x + dropout(attention(h, key_mask)) + dropout(mlp(h))

    Args:
        dim: model width D.
        num_heads: attention heads N.
        ffn: MLP inner width F.
        norm_eps: LayerNorm epsilon (always explicit: 1e-12 in BERT, 1e-5 in GPT).
        norm_position: "post", "pre" or "parallel".
        activation: the MLP's activation (see :class:`MLP`).
        bias: whether the MLP's linear layers have biases (the LayerNorms always do), and the
            attention's too unless ``attention_bias`` says otherwise.
        attention_bias: whether the four attention projections have biases; None: ``bias``.
        dropout: dropout rate on the attention and MLP outputs before the residual sum.
        attention_dropout: dropout rate on the attention probabilities.
        causal: causal self-attention.
        fused: the attention's fused path (see :class:`Attention`).
        rotary_dim: rotary dims per head in the attention (0: none; see :func:`apply_rotary`).
        rotary_base: the rotary wavelength base.
        rotary_layout: "interleaved" or "half" rotary pairs.
        num_kv_heads: grouped-query attention's key/value heads (None: ``num_heads``).
        norm: "layernorm" (weight and bias) or "rmsnorm" (weight; Llama).
        gated_mlp: a gated MLP (SwiGLU with "silu"; see :class:`MLP`).
        fused_qkv: one fused query/key/value projection (see :class:`Attention`).
        lora: LoRA adapters on the attention projections it targets.
        context_dim: adds a cross-attention to a ``context`` of this width (queries from the
            block's stream, keys and values from the context; Stable Diffusion); "pre" only.
        attention_out_bias: whether both attentions' ``o_proj`` have a bias; None: as their
            other projections.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: int,
        *,
        norm_eps: float,
        norm_position: str = "post",
        activation: str = "gelu",
        bias: bool = True,
        attention_bias: bool | None = None,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        causal: bool = False,
        fused: bool = False,
        rotary_dim: int = 0,
        rotary_base: float = 10000.0,
        rotary_layout: str = "interleaved",
        num_kv_heads: int | None = None,
        norm: str = "layernorm",
        gated_mlp: bool = False,
        fused_qkv: bool = False,
        lora: Lora | None = None,
        context_dim: int | None = None,
        attention_out_bias: bool | None = None,
    ):
        super().__init__()
        if context_dim is not None and norm_position != "pre":
            raise ValueError(f"context_dim needs norm_position 'pre', got {norm_position!r}")
        if norm_position not in ("post", "pre", "parallel"):
            raise ValueError(
                f"norm_position must be 'post' or 'pre' (BERT, GPT-3) or 'parallel' (GPT-J), "
                f"got {norm_position!r}"
            )
        self.norm_position = norm_position
        attention_bias = bias if attention_bias is None else attention_bias
        self.attention = Attention(
            dim, num_heads, bias=attention_bias, dropout=attention_dropout, causal=causal,
            fused=fused, rotary_dim=rotary_dim, rotary_base=rotary_base,
            rotary_layout=rotary_layout, num_kv_heads=num_kv_heads, fused_qkv=fused_qkv,
            lora=lora, out_bias=attention_out_bias,
        )  # fmt: skip
        self.attention_norm = make_norm(norm, dim, norm_eps)
        self.cross_attention = None
        if context_dim is not None:
            self.cross_attention = Attention(
                dim, num_heads, bias=attention_bias, dropout=attention_dropout, fused=fused,
                num_kv_heads=num_kv_heads, lora=lora, context_dim=context_dim,
                out_bias=attention_out_bias,
            )  # fmt: skip
            self.cross_attention_norm = make_norm(norm, dim, norm_eps)
        self.mlp = MLP(dim, ffn, activation=activation, bias=bias, dropout=0.0, gated=gated_mlp)
        if norm_position != "parallel":  # the parallel block's MLP reads attention_norm's output
            self.mlp_norm = make_norm(norm, dim, norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x (B, T, D) in and out; context (B, S, context_dim) for the cross-attention
        if self.norm_position == "parallel":
            h = self.attention_norm(x)
            return x + self.dropout(self.attention(h, key_mask)) + self.dropout(self.mlp(h))
        if self.norm_position == "pre":
            x = x + self.dropout(self.attention(self.attention_norm(x), key_mask))
            if self.cross_attention is not None:
                h = self.cross_attention(self.cross_attention_norm(x), context=context)
                x = x + self.dropout(h)
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attention_norm(x + self.dropout(self.attention(x, key_mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))

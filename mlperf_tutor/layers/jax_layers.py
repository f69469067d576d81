"""Flax NNX building blocks that the workloads share (same class, attribute and argument names
as ``torch_layers`` and ``tf_layers``); BatchNorm with PyTorch's numbers and RMSNorm are in
``jax_norms``.

Attention, MLP, TransformerBlock: https://arxiv.org/abs/1706.03762; grouped-query attention
https://arxiv.org/abs/2305.13245; post-LN as in BERT (https://arxiv.org/abs/1810.04805), pre-LN
as in GPT-2, parallel as in GPT-J (Wang & Komatsuzaki 2021,
https://github.com/kingoflolz/mesh-transformer-jax), pre-RMSNorm with a SwiGLU MLP as in Llama 2
(Touvron et al. 2023, https://arxiv.org/abs/2307.09288; SwiGLU: Shazeer 2020,
https://arxiv.org/abs/2002.05202), LoRA adapters as :mod:`mlperf_tutor.layers.lora` specifies,
cross-attention on a text context as Stable Diffusion's (https://arxiv.org/abs/2112.10752).
Rotary positions: Su et al. 2021, RoFormer
(https://arxiv.org/abs/2104.09864). Dimension letters: B batch, T query time, S key time,
D model, N heads, K kv heads, G = N // K query heads per kv head, H head dim, F MLP width,
R rotary dims.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mlperf_tutor.layers.jax_norms import RMSNorm
from mlperf_tutor.layers.spec import Lora

# --- transformer blocks ---------------------------------------------------------------------
# Added to the scores of padded keys: the MLPerf BERT reference's value. Not -inf, so a row
# without any real key gives finite weights (the reference's numbers), never NaN.
KEY_MASK_VALUE = -10000.0
# Replaces the scores of future keys (causal=True), whatever padding added to them.
CAUSAL_MASK_VALUE = float(jnp.finfo(jnp.float32).min)

# Explicit approximations: jax.nn.gelu defaults to the tanh form, PyTorch's to the exact one.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` ("gelu" is exact, "gelu_tanh" approximate)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def apply_rotary(
    x: jax.Array, rotary_dim: int, base: float = 10000.0, layout: str = "interleaved"
) -> jax.Array:
    """Rotary position embedding (Su et al. 2021, https://arxiv.org/abs/2104.09864).

    Rotates pair j of the first ``rotary_dim`` dims of every head at position t (0..T-1) by the
    angle ``t * base**(-2j / rotary_dim)``; the other dims pass through. The angles, cosines
    and sines are computed in float32 at least (float64 for float64 inputs).

    Args:
        x: queries or keys, (B, T, heads, H).
        rotary_dim: R, the even number of dims rotated (at most H).
        base: the base of the angle frequencies.
        layout: which dims form pair j: "interleaved" (2j, 2j + 1), as GPT-J; "half"
            (j, j + R / 2), as GPT-NeoX and Llama.

    Returns:
        The rotated array, of ``x``'s shape and dtype.
    """
    if layout not in ("interleaved", "half"):
        raise ValueError(f"rotary layout must be 'interleaved' or 'half', got {layout!r}")
    if rotary_dim % 2 or not 0 < rotary_dim <= x.shape[-1]:
        raise ValueError(
            f"rotary_dim ({rotary_dim}) must be even and in (0, head dim {x.shape[-1]}]"
        )
    acc = jnp.promote_types(x.dtype, jnp.float32)
    t = x.shape[1]
    inv_freq = 1.0 / base ** (jnp.arange(0, rotary_dim, 2, dtype=acc) / rotary_dim)  # (R/2,)
    angle = jnp.arange(t, dtype=acc)[:, None] * inv_freq  # (T, R/2)
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]  # (1, T, 1, R/2)
    rot, rest = x[..., :rotary_dim].astype(acc), x[..., rotary_dim:]
    if layout == "interleaved":
        pairs = rot.reshape(*rot.shape[:-1], rotary_dim // 2, 2)  # (B, T, N, R/2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        rot = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rot.shape)
    else:
        a, b = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
        rot = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return jnp.concatenate([rot.astype(x.dtype), rest], axis=-1)  # (B, T, N, H)


NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, eps: float, *, rngs: nnx.Rngs) -> nnx.Module:
    """A LayerNorm with scale and bias ("layernorm") or an :class:`RMSNorm` ("rmsnorm")."""
    if kind == "layernorm":
        # Two-pass variance, as PyTorch computes it (Flax's default is E[x^2] - E[x]^2).
        return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


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


class Attention(nnx.Module):
    """Multi-head self-attention with optional grouped-query heads, key padding, causality and
    rotary positions; or cross-attention (``context_dim``): keys and values from a context.

    Scores are computed and softmaxed in float32 at least; padded keys (``key_mask == 0``) get
    :data:`KEY_MASK_VALUE` added, future keys (``causal=True``) :data:`CAUSAL_MASK_VALUE`.
    Query head ``n`` reads kv head ``n // G`` (the order of ``repeat_interleave``). With
    ``rotary_dim > 0``, q and k are rotated (:func:`apply_rotary`) after the projections, on
    both the explicit and the fused path.

    Args:
        dim: model width D.
        num_heads: query heads N; the head dim is H = D / N.
        num_kv_heads: key/value heads K (N must be a multiple); default N.
        bias: whether the four projections have biases.
        dropout: dropout rate on the attention probabilities (train mode only).
        causal: mask keys after the query's position.
        fused: use ``jax.nn.dot_product_attention`` instead of the explicit einsums: cuDNN's
            fused kernel on GPU for bfloat16/float16 inputs, XLA's implementation otherwise.
            It has no attention dropout, so ``dropout`` must be 0. Off by default: the explicit
            path is the parity reference. (Measured on an H200, bf16, B 32, T 512, D 768, 12
            heads, key mask: this module's forward + backward 1.4 ms fused, 2.1 ms explicit.)
        fused_implementation: ``implementation`` of ``jax.nn.dot_product_attention``: "xla"
            or "cudnn" (GPU, bfloat16/float16 only); None picks cuDNN for half-precision
            inputs on GPU with query and key lengths multiples of 64, XLA otherwise.
        rotary_dim: dims of each q and k head that rotary positions rotate (0: none).
        rotary_base: the rotary angles' base.
        rotary_layout: "interleaved" (GPT-J) or "half" (Llama); see :func:`apply_rotary`.
        fused_qkv: one ``qkv_proj`` whose output is the N H query dims, then the K H key and
            the K H value dims (the MLPerf Llama 2 checkpoint's layout), instead of three.
        lora: LoRA adapters on the projections it targets (``qkv_proj``, ``o_proj``, ...).
        context_dim: width of the context (B, S, context_dim) that ``k_proj`` and ``v_proj``
            read (cross-attention, as Stable Diffusion's); None: self-attention.
        out_bias: whether ``o_proj`` has a bias; None: as ``bias``.
        rngs: initialisers' keys and the dropout streams.
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
        fused_implementation: str | None = None,
        rotary_dim: int = 0,
        rotary_base: float = 10000.0,
        rotary_layout: str = "interleaved",
        fused_qkv: bool = False,
        lora: Lora | None = None,
        context_dim: int | None = None,
        out_bias: bool | None = None,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_kv_heads or num_heads
        if context_dim is not None and (causal or rotary_dim or fused_qkv):
            raise ValueError(
                "cross-attention (context_dim) has no causal mask, rotary positions or fused "
                "qkv_proj: the keys come from another sequence"
            )
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"dim ({dim}) must be a multiple of num_heads ({num_heads}), and num_heads of "
                f"num_kv_heads ({num_kv_heads})"
            )
        if fused and dropout:
            raise ValueError(
                "fused attention (jax.nn.dot_product_attention) has no attention-probability "
                f"dropout; pass dropout=0.0 (got {dropout}) or fused=False"
            )
        if fused_implementation not in (None, "xla", "cudnn"):
            raise ValueError(
                f"fused_implementation must be None, 'xla' or 'cudnn', got {fused_implementation!r}"
            )
        if rotary_layout not in ("interleaved", "half"):
            raise ValueError(
                f"rotary_layout must be 'interleaved' or 'half', got {rotary_layout!r}"
            )
        if rotary_dim % 2 or not 0 <= rotary_dim <= dim // num_heads:
            raise ValueError(
                f"rotary_dim ({rotary_dim}) must be even and at most the head dim "
                f"({dim // num_heads})"
            )
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.causal, self.fused = causal, fused
        self.fused_implementation = fused_implementation
        self.rotary_dim, self.rotary_layout = rotary_dim, rotary_layout
        self.rotary_base = rotary_base
        kv_dim = num_kv_heads * self.head_dim
        self.fused_qkv, self.context_dim = fused_qkv, context_dim
        linear = functools.partial(make_linear, lora=lora, rngs=rngs)
        kv_in = dim if context_dim is None else context_dim
        if fused_qkv:
            self.qkv_proj = linear("qkv_proj", dim, dim + 2 * kv_dim, bias=bias)
        else:
            self.q_proj = linear("q_proj", dim, dim, bias=bias)
            self.k_proj = linear("k_proj", kv_in, kv_dim, bias=bias)
            self.v_proj = linear("v_proj", kv_in, kv_dim, bias=bias)
        self.o_proj = linear("o_proj", dim, dim, bias=bias if out_bias is None else out_bias)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def _project(self, x: jax.Array, source: jax.Array) -> tuple[jax.Array, ...]:
        # (B, T, N H), (B, S, K H), (B, S, K H); source is x itself (S = T) or the context
        if self.fused_qkv:
            q_dim = self.num_heads * self.head_dim
            kv_dim = self.num_kv_heads * self.head_dim
            q, k, v = jnp.split(self.qkv_proj(x), [q_dim, q_dim + kv_dim], axis=-1)
            return q, k, v
        return self.q_proj(x), self._keys(source), self.v_proj(source)

    def _keys(self, x: jax.Array) -> jax.Array:
        # Without rotary, the key bias adds q . b to every score of a query alike, which softmax
        # ignores: its gradient is exactly zero. Computed through the graph it is round-off
        # (~1e-12) that differs between frameworks and that Adam (eps 1e-8) amplifies into
        # visible drift, so the bias enters the keys as a constant: same forward, exact zero.
        if self.k_proj.bias is None or self.rotary_dim or isinstance(self.k_proj, LoRALinear):
            return self.k_proj(x)
        bias = jax.lax.stop_gradient(self.k_proj.bias[...])
        return x @ self.k_proj.kernel[...] + bias

    def __call__(
        self, x: jax.Array, key_mask: jax.Array | None = None, context: jax.Array | None = None
    ) -> jax.Array:
        if (context is None) != (self.context_dim is None):
            raise ValueError(
                "pass a context exactly when the attention was built with context_dim "
                f"(context_dim={self.context_dim}, context given: {context is not None})"
            )
        b, t, _ = x.shape  # (B, T, D)
        source = x if context is None else context  # (B, S, D) or (B, S, context_dim)
        s = source.shape[1]
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        q, keys, values = self._project(x, source)
        q = q.reshape(b, t, n, h)  # (B, T, N, H)
        keys = keys.reshape(b, s, k, h)  # (B, S, K, H); self-attention: S = T
        values = values.reshape(b, s, k, h)  # (B, S, K, H)
        if self.rotary_dim:
            q = apply_rotary(q, self.rotary_dim, self.rotary_base, self.rotary_layout)
            keys = apply_rotary(keys, self.rotary_dim, self.rotary_base, self.rotary_layout)
        pad = None
        if key_mask is not None:
            pad = (1.0 - key_mask.astype(jnp.float32)) * KEY_MASK_VALUE  # (B, S)
        if self.fused:
            out = self._fused(q, keys, values, pad)
        else:
            out = self._explicit(q, keys, values, pad)
        return self.o_proj(out.reshape(b, t, n * h))  # (B, T, D)

    def _explicit(self, q, keys, values, pad):
        b, t, n, h = q.shape
        k = self.num_kv_heads
        q = q.reshape(b, t, k, n // k, h)  # (B, T, K, G, H)
        # Scores and softmax in float32 at least: in bf16 the row sums and small probabilities
        # would keep 8 bits.
        acc = jnp.promote_types(q.dtype, jnp.float32)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys, preferred_element_type=acc)
        scores = scores * (1.0 / math.sqrt(h))  # scaled after the product, as the reference
        if pad is not None:
            scores = scores + pad[:, None, None, None, :]
        if self.causal:
            s = keys.shape[1]
            allowed = jnp.tril(jnp.ones((t, s), bool))  # (T, S): key position <= query's
            scores = jnp.where(allowed, scores, CAUSAL_MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)  # (B, K, G, T, S)
        probs = self.dropout(probs)
        return jnp.einsum("BKGTS,BSKH->BTKGH", probs, values)  # (B, T, K, G, H)

    def _fused(self, q, keys, values, pad):
        b, t = q.shape[:2]
        half = q.dtype in (jnp.bfloat16, jnp.float16)
        # cuDNN's kernel takes only half-precision inputs, and a bias broadcast over T
        # (not over N): (B, 1, 1, S) is refused, (B, 1, T, S) accepted.
        # Its flash kernel also refuses other lengths than multiples of 64 (SD's 77 context
        # tokens: "Unsupported sequence length"), which get XLA's.
        implementation = self.fused_implementation
        lengths_ok = t % 64 == 0 and keys.shape[1] % 64 == 0
        if implementation is None and half and lengths_ok and jax.default_backend() == "gpu":
            implementation = "cudnn"
        bias = None
        if pad is not None:
            bias = jnp.broadcast_to(pad[:, None, None, :], (b, 1, t, keys.shape[1]))
            bias = bias.astype(q.dtype)  # (B, 1, T, S)
        return jax.nn.dot_product_attention(
            q, keys, values, bias=bias, scale=1.0 / math.sqrt(q.shape[-1]),
            is_causal=self.causal, implementation=implementation,
        )  # fmt: skip  # (B, T, N, H)


class MLP(nnx.Module):
    """Feed-forward network: ``fc_out(dropout(activation(fc_in(x))))``, or with ``gated``
    (SwiGLU with "silu", as Llama: ``gate_proj`` = ``fc_gate``, ``up_proj`` = ``fc_in``,
    ``down_proj`` = ``fc_out``) ``fc_out(dropout(activation(fc_gate(x)) * fc_in(x)))``.

    Args:
        dim: model width D (input and output).
        hidden: inner width F.
        activation: "gelu" (exact, erf), "gelu_tanh", "relu" or "silu".
        bias: whether the layers have biases.
        dropout: dropout rate on the hidden activations (train mode only); a transformer
            block's residual dropout on the output is the block's, not this.
        gated: a third projection ``fc_gate`` whose activation multiplies ``fc_in(x)``.
        rngs: initialisers' keys and the dropout stream.
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
        rngs: nnx.Rngs,
    ):
        get_activation(activation)  # fail at construction on a bad name
        self.activation = activation
        self.fc_gate = nnx.Linear(dim, hidden, use_bias=bias, rngs=rngs) if gated else None
        self.fc_in = nnx.Linear(dim, hidden, use_bias=bias, rngs=rngs)
        self.fc_out = nnx.Linear(hidden, dim, use_bias=bias, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        if self.fc_gate is None:
            hidden = act(self.fc_in(x))  # (..., F)
        else:
            hidden = act(self.fc_gate(x)) * self.fc_in(x)  # (..., F)
        return self.fc_out(self.dropout(hidden))  # (..., D)


class TransformerBlock(nnx.Module):
    """Self-attention and MLP, each with a residual connection, LayerNorm (or RMSNorm) and
    dropout.

    ``norm_position="post"`` (BERT)::

        x = attention_norm(x + dropout(attention(x, key_mask)))
        x = mlp_norm(x + dropout(mlp(x)))

    ``norm_position="pre"`` (GPT)::

        x = x + dropout(attention(attention_norm(x), key_mask))
        x = x + dropout(cross_attention(cross_attention_norm(x), context))  # with context_dim
        x = x + dropout(mlp(mlp_norm(x)))

    ``norm_position="parallel"`` (GPT-J; Wang & Komatsuzaki 2021,
    https://github.com/kingoflolz/mesh-transformer-jax): one norm, no ``mlp_norm``::

        h = attention_norm(x)
        x = x + dropout(attention(h, key_mask)) + dropout(mlp(h))

    Args:
        dim: model width D.
        num_heads: attention heads N.
        ffn: MLP width F.
        norm_eps: the norms' epsilon (always explicit: frameworks' defaults differ).
        norm_position: "post", "pre" or "parallel".
        activation: the MLP's activation (see :class:`MLP`).
        bias: biases in the MLP, and in the attention projections unless
            ``attention_bias`` says otherwise.
        attention_bias: biases in the attention projections; None: as ``bias``.
        dropout: residual dropout on the attention and MLP outputs.
        attention_dropout: dropout on the attention probabilities.
        causal: causal self-attention.
        fused: the attention's fused path (see :class:`Attention`).
        fused_implementation: the fused path's implementation (see :class:`Attention`).
        rotary_dim: rotary dims of q and k per head (0: no rotary positions).
        rotary_base: the rotary angles' base.
        rotary_layout: "interleaved" or "half" (see :func:`apply_rotary`).
        num_kv_heads: grouped-query attention's key/value heads (None: ``num_heads``).
        norm: "layernorm" (scale and bias) or "rmsnorm" (scale; Llama).
        gated_mlp: a gated MLP (SwiGLU with "silu"; see :class:`MLP`).
        fused_qkv: one fused query/key/value projection (see :class:`Attention`).
        lora: LoRA adapters on the attention projections it targets.
        context_dim: width of the context that a cross-attention (after the self-attention;
            Stable Diffusion's) reads; None: no cross-attention. Pre-norm blocks only.
        attention_out_bias: the bias of the attentions' ``o_proj``; None: as ``attention_bias``.
        rngs: initialisers' keys and the dropout streams.
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
        fused_implementation: str | None = None,
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
        rngs: nnx.Rngs,
    ):
        if norm_position not in ("post", "pre", "parallel"):
            raise ValueError(
                f"norm_position must be 'post', 'pre' or 'parallel', got {norm_position!r}"
            )
        if context_dim is not None and norm_position != "pre":
            raise ValueError(
                f"cross-attention (context_dim) needs norm_position='pre', got {norm_position!r}"
            )
        self.norm_position = norm_position
        attention = functools.partial(
            Attention, dim, num_heads, bias=bias if attention_bias is None else attention_bias,
            out_bias=attention_out_bias, dropout=attention_dropout, fused=fused,
            fused_implementation=fused_implementation, num_kv_heads=num_kv_heads, lora=lora,
            rngs=rngs,
        )  # fmt: skip
        self.attention = attention(
            causal=causal, rotary_dim=rotary_dim, rotary_base=rotary_base,
            rotary_layout=rotary_layout, fused_qkv=fused_qkv,
        )  # fmt: skip
        self.attention_norm = make_norm(norm, dim, norm_eps, rngs=rngs)
        cross = context_dim is not None
        self.cross_attention = attention(context_dim=context_dim) if cross else None
        self.cross_attention_norm = make_norm(norm, dim, norm_eps, rngs=rngs) if cross else None
        self.mlp = MLP(dim, ffn, activation=activation, bias=bias, gated=gated_mlp, rngs=rngs)
        if norm_position != "parallel":  # the parallel block's MLP reads attention_norm's output
            self.mlp_norm = make_norm(norm, dim, norm_eps, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(
        self, x: jax.Array, key_mask: jax.Array | None = None, context: jax.Array | None = None
    ) -> jax.Array:
        if context is not None and self.cross_attention is None:
            raise ValueError("a context needs a block built with context_dim (cross-attention)")
        if self.norm_position == "parallel":
            h = self.attention_norm(x)
            return x + self.dropout(self.attention(h, key_mask)) + self.dropout(self.mlp(h))
        if self.norm_position == "post":
            x = self.attention_norm(x + self.dropout(self.attention(x, key_mask)))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))  # (B, T, D)
        x = x + self.dropout(self.attention(self.attention_norm(x), key_mask))
        if self.cross_attention is not None:  # its Attention refuses a missing context
            h = self.cross_attention_norm(x)
            x = x + self.dropout(self.cross_attention(h, context=context))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))  # (B, T, D)

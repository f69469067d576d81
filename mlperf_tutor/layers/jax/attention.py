"""Multi-head attention in Flax NNX, built from an :class:`~mlperf_tutor.layers.spec.AttentionSpec`.

Attention: Vaswani et al. 2017 (https://arxiv.org/abs/1706.03762); grouped-query heads
(https://arxiv.org/abs/2305.13245) as Llama 2's; rotary positions (:mod:`.rotary`); cross-attention
on a text context as Stable Diffusion's (https://arxiv.org/abs/2112.10752); LoRA adapters on the
projections (:mod:`.lora`). The mask values are :data:`~mlperf_tutor.layers.spec.KEY_MASK_VALUE`
and :data:`~mlperf_tutor.layers.spec.CAUSAL_MASK_VALUE`. Dimension letters: B batch, T query
time, S key time, D model, N heads, K kv heads, G = N / K query heads per kv head, H head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mlperf_tutor.layers.jax.lora import LoRALinear, make_linear
from mlperf_tutor.layers.jax.rotary import apply_rotary
from mlperf_tutor.layers.spec import CAUSAL_MASK_VALUE, KEY_MASK_VALUE, AttentionSpec


class Attention(nnx.Module):
    """Multi-head attention (B, T, D) -> (B, T, D) as ``spec`` describes it: self-attention, or
    cross-attention whose keys and values read a context (B, S, context_dim).

    Scores are computed and softmaxed in float32 at least; padded keys (``key_mask == 0``) get
    :data:`KEY_MASK_VALUE` added, future keys (``spec.causal``) :data:`CAUSAL_MASK_VALUE`.
    Query head ``n`` reads kv head ``n // G`` (the order of ``repeat_interleave``). With
    ``spec.rotary_dim > 0``, q and k are rotated (:func:`apply_rotary`) after the projections,
    on both the explicit and the fused path.

    ``spec.fused`` runs ``jax.nn.dot_product_attention`` instead of the explicit einsums, with
    ``spec.fused_implementation`` ("xla" or "cudnn"); None picks cuDNN for half-precision inputs
    on GPU with query and key lengths multiples of 64, XLA otherwise. It has no attention
    dropout, so a fused spec needs ``dropout`` 0.

    Args:
        spec: the attention.
        rngs: initialisers' keys and the dropout streams (dropout in train mode only).
    """

    def __init__(self, spec: AttentionSpec, *, rngs: nnx.Rngs):
        if spec.fused and spec.dropout:
            raise ValueError(
                "fused attention (jax.nn.dot_product_attention) has no attention-probability "
                f"dropout; use dropout=0.0 (got {spec.dropout}) or fused=False"
            )
        self.spec = spec
        d, kv_dim = spec.dim, spec.kv_heads * spec.head_dim
        linear = functools.partial(make_linear, bias=spec.bias, lora=spec.lora, rngs=rngs)
        kv_in = d if spec.context_dim is None else spec.context_dim
        if spec.fused_qkv:
            self.qkv_proj = linear("qkv_proj", d, d + 2 * kv_dim)
        else:
            self.q_proj = linear("q_proj", d, d)
            self.k_proj = linear("k_proj", kv_in, kv_dim)
            self.v_proj = linear("v_proj", kv_in, kv_dim)
        self.o_proj = linear("o_proj", d, d, bias=spec.has_out_bias)
        self.dropout = nnx.Dropout(spec.dropout, rngs=rngs)

    def _project(self, x: jax.Array, source: jax.Array) -> tuple[jax.Array, ...]:
        # (B, T, N H), (B, S, K H), (B, S, K H); source is x itself (S = T) or the context
        if self.spec.fused_qkv:
            q_dim = self.spec.num_heads * self.spec.head_dim
            kv_dim = self.spec.kv_heads * self.spec.head_dim
            q, k, v = jnp.split(self.qkv_proj(x), [q_dim, q_dim + kv_dim], axis=-1)
            return q, k, v
        return self.q_proj(x), self._keys(source), self.v_proj(source)

    def _keys(self, x: jax.Array) -> jax.Array:
        # Without rotary, the key bias adds q . b to every score of a query alike, which softmax
        # ignores: its gradient is exactly zero. Computed through the graph it is round-off
        # (~1e-12) that differs between frameworks and that Adam (eps 1e-8) amplifies into
        # visible drift, so the bias enters the keys as a constant: same forward, exact zero.
        if self.k_proj.bias is None or self.spec.rotary_dim or isinstance(self.k_proj, LoRALinear):
            return self.k_proj(x)
        bias = jax.lax.stop_gradient(self.k_proj.bias[...])
        return x @ self.k_proj.kernel[...] + bias

    def __call__(
        self, x: jax.Array, key_mask: jax.Array | None = None, context: jax.Array | None = None
    ) -> jax.Array:
        spec = self.spec
        if (context is None) != (spec.context_dim is None):
            raise ValueError(
                "pass a context exactly when the attention was built with context_dim "
                f"(context_dim={spec.context_dim}, context given: {context is not None})"
            )
        b, t, _ = x.shape  # (B, T, D)
        if context is None:
            spec.check_length(t)
        source = x if context is None else context  # (B, S, D) or (B, S, context_dim)
        s = source.shape[1]
        n, k, h = spec.num_heads, spec.kv_heads, spec.head_dim
        q, keys, values = self._project(x, source)
        q = q.reshape(b, t, n, h)  # (B, T, N, H)
        keys = keys.reshape(b, s, k, h)  # (B, S, K, H); self-attention: S = T
        values = values.reshape(b, s, k, h)  # (B, S, K, H)
        if spec.rotary_dim:
            q = apply_rotary(q, spec.rotary_dim, spec.rotary_base, spec.rotary_layout)
            keys = apply_rotary(keys, spec.rotary_dim, spec.rotary_base, spec.rotary_layout)
        pad = None
        if key_mask is not None:
            pad = (1.0 - key_mask.astype(jnp.float32)) * KEY_MASK_VALUE  # (B, S)
        if spec.fused:
            out = self._fused(q, keys, values, pad)
        else:
            out = self._explicit(q, keys, values, pad)
        return self.o_proj(out.reshape(b, t, n * h))  # (B, T, D)

    def _explicit(self, q, keys, values, pad):
        b, t, n, h = q.shape
        k = self.spec.kv_heads
        q = q.reshape(b, t, k, n // k, h)  # (B, T, K, G, H)
        # Scores and softmax in float32 at least: in bf16 the row sums and small probabilities
        # would keep 8 bits.
        acc = jnp.promote_types(q.dtype, jnp.float32)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys, preferred_element_type=acc)
        scores = scores * (1.0 / math.sqrt(h))  # scaled after the product, as the reference
        if pad is not None:
            scores = scores + pad[:, None, None, None, :]
        if self.spec.causal:
            allowed = jnp.tril(jnp.ones((t, keys.shape[1]), bool))  # (T, S): key pos <= query's
            scores = jnp.where(allowed, scores, CAUSAL_MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)  # (B, K, G, T, S)
        probs = self.dropout(probs)
        return jnp.einsum("BKGTS,BSKH->BTKGH", probs, values)  # (B, T, K, G, H)

    def _fused(self, q, keys, values, pad):
        b, t = q.shape[:2]
        s = keys.shape[1]
        half = q.dtype in (jnp.bfloat16, jnp.float16)
        # cuDNN's kernel takes only half-precision inputs, and a bias broadcast over T
        # (not over N): (B, 1, 1, S) is refused, (B, 1, T, S) accepted.
        # Its flash kernel also refuses other lengths than multiples of 64 (SD's 77 context
        # tokens: "Unsupported sequence length"), which get XLA's.
        implementation = self.spec.fused_implementation
        lengths_ok = t % 64 == 0 and s % 64 == 0
        if implementation is None and half and lengths_ok and jax.default_backend() == "gpu":
            implementation = "cudnn"
        bias = None
        if pad is not None:
            bias = jnp.broadcast_to(pad[:, None, None, :], (b, 1, t, s))
            bias = bias.astype(q.dtype)  # (B, 1, T, S)
        return jax.nn.dot_product_attention(
            q,
            keys,
            values,
            bias=bias,
            scale=1.0 / math.sqrt(q.shape[-1]),
            is_causal=self.spec.causal,
            implementation=implementation,
        )  # (B, T, N, H)

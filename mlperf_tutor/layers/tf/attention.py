"""Multi-head attention in Keras, with the numbers of ``layers/torch/attention.py``.

Attention: Vaswani et al. 2017 (https://arxiv.org/abs/1706.03762); grouped-query attention:
Ainslie et al. 2023 (https://arxiv.org/abs/2305.13245); rotary positions: Su et al. 2021
(https://arxiv.org/abs/2104.09864). Cross-attention (keys and values from a ``context``, Stable
Diffusion's text tokens) is the same layer built from a spec with ``context_dim``.

Every sublayer gets ``name=`` equal to its attribute name, so Keras paths read like the
canonical names.
"""

from __future__ import annotations

import dataclasses
import math

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
from keras import ops

from mlperf_tutor.layers.spec import CAUSAL_MASK_VALUE, KEY_MASK_VALUE, AttentionSpec, Lora
from mlperf_tutor.layers.tf.lora import LoRALinear, make_linear
from mlperf_tutor.layers.tf.rotary import apply_rotary, math_dtype


def key_padding_bias(key_mask, dtype):
    """(B, S) of 1 (real key) / 0 (padding) -> (B, S) additive bias: 0, or
    :data:`~mlperf_tutor.layers.spec.KEY_MASK_VALUE` on padded keys, in ``dtype``."""
    return (1.0 - ops.cast(key_mask, dtype)) * KEY_MASK_VALUE


def future_mask(t):
    """(T, T) booleans, True where key s comes after query t (masked under ``causal``)."""
    return ops.arange(t)[:, None] < ops.arange(t)[None, :]


def attention_spec_from_config(config: dict) -> AttentionSpec:
    """The :class:`AttentionSpec` of a ``dataclasses.asdict`` dict (``Attention.get_config``);
    lists that a JSON round trip made of tuples become tuples again."""
    lora = config.get("lora")
    if lora is not None:
        lora = Lora(**{**lora, "targets": tuple(lora["targets"])})
    return AttentionSpec(**{**config, "lora": lora})


class Attention(keras.layers.Layer):
    """The multi-head attention that ``spec`` describes (see :class:`~mlperf_tutor.layers.spec.
    AttentionSpec`): self-attention, or cross-attention to a ``context`` when
    ``spec.context_dim`` is set.

    ``scores = q k^T / sqrt(H)`` in float32 at least (float64 for a float64 layer), padded keys
    biased, future keys masked under ``causal``, softmax, dropout, ``o_proj`` of the heads'
    outputs. Rotary positions go on queries and keys right after their projections, before the
    kv heads are repeated and before either path.

    ``spec.fused`` uses ``keras.ops.dot_product_attention`` instead of the explicit einsums: on
    the TensorFlow backend the same math in one op (Keras has flash kernels only for its JAX and
    PyTorch backends), without attention dropout, so the spec's ``dropout`` must be 0. The
    explicit path is the parity reference.

    Args:
        spec: heads, biases, masks, rotary, fused qkv, LoRA, context width and kernel choice.
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (B, T, D); key_mask: (B, S) of 1 (real key) / 0 (padding), or None; context:
        (B, S, context_dim), given exactly when ``spec.context_dim`` is set (self-attention:
        S = T, at most ``spec.max_positions``). Output (B, T, D).
    """

    def __init__(self, spec: AttentionSpec, **kwargs):
        super().__init__(**kwargs)
        if spec.fused and spec.dropout:
            raise ValueError(
                "fused attention (keras.ops.dot_product_attention) has no attention-probability "
                f"dropout; use dropout 0.0 (got {spec.dropout}) or fused=False"
            )
        self.spec = spec
        dtype, lora = self.dtype_policy, spec.lora
        kv_dim = spec.kv_heads * spec.head_dim
        if spec.fused_qkv:
            self.qkv_proj = make_linear(
                "qkv_proj", spec.dim + 2 * kv_dim, bias=spec.bias, lora=lora, dtype=dtype
            )
        else:
            self.q_proj = make_linear("q_proj", spec.dim, bias=spec.bias, lora=lora, dtype=dtype)
            self.k_proj = make_linear("k_proj", kv_dim, bias=spec.bias, lora=lora, dtype=dtype)
            self.v_proj = make_linear("v_proj", kv_dim, bias=spec.bias, lora=lora, dtype=dtype)
        self.o_proj = make_linear(
            "o_proj", spec.dim, bias=spec.has_out_bias, lora=lora, dtype=dtype
        )
        self.dropout = keras.layers.Dropout(spec.dropout, name="dropout", dtype=dtype)

    def _keys(self, x, training):
        # Without rotary, the key bias adds q . b to every score of a query alike, which softmax
        # ignores: its gradient is exactly zero. Computed through the graph it is round-off
        # (~1e-12) that differs between frameworks and that Adam (eps 1e-8) amplifies into
        # visible drift, so the bias enters the keys as a constant: same forward, exact zero.
        if not self.k_proj.use_bias or self.spec.rotary_dim or isinstance(self.k_proj, LoRALinear):
            return self.k_proj(x, training=training)
        if not self.k_proj.built:
            self.k_proj.build(x.shape)
        return ops.matmul(x, self.k_proj.kernel) + ops.stop_gradient(self.k_proj.bias)

    def call(self, x, key_mask=None, context=None, training=False):
        spec = self.spec
        if (context is None) == spec.is_cross:
            raise ValueError(
                f"Attention {self.name!r} needs a context exactly when its spec has a "
                f"context_dim (context_dim={spec.context_dim}, context given: "
                f"{context is not None})"
            )
        if not spec.is_cross:
            spec.check_length(x.shape[1])  # None inside a shape-relaxed tf.function
        b, t = ops.shape(x)[:2]  # tensors, not ints, inside a shape-relaxed tf.function
        n, k, h = spec.num_heads, spec.kv_heads, spec.head_dim
        q, keys, values = self._project(x, x if context is None else context, training)
        s = ops.shape(keys)[1]
        q = ops.reshape(q, (b, t, n, h))  # (B, T, N, H)
        keys = ops.reshape(keys, (b, s, k, h))  # (B, S, K, H); self-attention: S = T
        values = ops.reshape(values, (b, s, k, h))  # (B, S, K, H)
        if spec.rotary_dim:
            q = self._rotate(q)
            keys = self._rotate(keys)
        if k != n:  # each kv head serves n // k consecutive query heads
            keys = ops.repeat(keys, n // k, axis=2)  # (B, S, N, H)
            values = ops.repeat(values, n // k, axis=2)  # (B, S, N, H)
        pad = None
        if key_mask is not None:
            pad = key_padding_bias(key_mask, math_dtype(self.compute_dtype))  # (B, S)
        if spec.fused:
            out = ops.dot_product_attention(
                q,
                keys,
                values,
                bias=None if pad is None else pad[:, None, None, :],
                scale=1.0 / math.sqrt(h),
                is_causal=spec.causal,
            )
        else:
            out = self._explicit(q, keys, values, pad, training)  # (B, T, N, H)
        return self.o_proj(ops.reshape(out, (b, t, n * h)), training=training)  # (B, T, D)

    def _project(self, x, source, training):
        # (B, T, N H), (B, S, K H), (B, S, K H): keys and values from ``source`` (x, or the
        # context of cross-attention); ``training`` reaches LoRA's dropout.
        if self.spec.fused_qkv:
            q_dim, kv_dim = self.spec.dim, self.spec.kv_heads * self.spec.head_dim
            qkv = self.qkv_proj(x, training=training)
            return ops.split(qkv, [q_dim, q_dim + kv_dim], axis=-1)
        keys = self._keys(source, training)
        return self.q_proj(x, training=training), keys, self.v_proj(source, training=training)

    def _rotate(self, x):
        spec = self.spec
        return apply_rotary(x, spec.rotary_dim, float(spec.rotary_base), spec.rotary_layout)

    def _explicit(self, q, keys, values, pad, training):
        # Scaled after the product, as the BERT reference and transformers' eager path do.
        scores = ops.einsum("BTNH,BSNH->BNTS", q, keys) * (1.0 / math.sqrt(self.spec.head_dim))
        # float32 scores at least: in bfloat16 the -10000 mask would swamp them.
        scores = ops.cast(scores, math_dtype(self.compute_dtype))  # (B, N, T, S)
        if pad is not None:
            scores = scores + pad[:, None, None, :]
        if self.spec.causal:
            scores = ops.where(future_mask(ops.shape(q)[1]), CAUSAL_MASK_VALUE, scores)
        probs = ops.cast(ops.softmax(scores, axis=-1), self.compute_dtype)
        probs = self.dropout(probs, training=training)  # (B, N, T, S)
        return ops.einsum("BNTS,BSNH->BTNH", probs, values)  # (B, T, N, H)

    def get_config(self) -> dict:
        return {**super().get_config(), "spec": dataclasses.asdict(self.spec)}

    @classmethod
    def from_config(cls, config: dict) -> Attention:
        return super().from_config({**config, "spec": attention_spec_from_config(config["spec"])})

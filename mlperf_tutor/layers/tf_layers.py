"""Keras building blocks that the workloads share, with the numbers of the PyTorch versions.

Built-in Keras layers are used wherever they compute the same numbers as PyTorch given explicit
arguments (Dense, Conv with explicit padding, Embedding, LayerNormalization, GroupNormalization).
This module adds what Keras lacks or computes differently (BatchNorm with PyTorch's numbers is
in ``tf_norms``):

* :class:`Attention`, :class:`MLP`, :class:`TransformerBlock`: the transformer blocks of BERT,
  GPT-3, GPT-J, Llama 2 and Stable Diffusion, with the class, attribute and argument names of
  ``torch_layers`` and ``jax_layers``. Attention: Vaswani et al. 2017
  (https://arxiv.org/abs/1706.03762); grouped-query attention: Ainslie et al. 2023
  (https://arxiv.org/abs/2305.13245); pre-LN: Xiong et al. 2020 (https://arxiv.org/abs/2002.04745);
  parallel attention and MLP: Wang & Komatsuzaki 2021 (GPT-J,
  https://github.com/kingoflolz/mesh-transformer-jax).
  Cross-attention (keys and values from a ``context``, Stable Diffusion's text tokens) is
  the same Attention with ``context_dim``.
* :func:`apply_rotary` (defined in ``tf_rotary``): rotary position embeddings, Su et al. 2021
  (RoFormer, https://arxiv.org/abs/2104.09864).
* :class:`LoRALinear`, :func:`make_linear`: a Dense layer plus a LoRA adapter as
  :mod:`mlperf_tutor.layers.lora` specifies; the gated (SwiGLU, Shazeer 2020,
  https://arxiv.org/abs/2002.05202) MLP and pre-RMSNorm blocks of Llama 2 (Touvron et al. 2023,
  https://arxiv.org/abs/2307.09288). RMSNorm and :func:`make_norm` live in ``tf_norms``.

Every sublayer gets ``name=`` equal to its attribute name, so Keras paths read like the
canonical names. Dense kernels, biases and embeddings are created as zeros: weights always come
from ``load_canonical`` (a workload's numpy ``init_canonical`` or a checkpoint), so no time goes
into random numbers that are overwritten.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
from keras import ops

from mlperf_tutor.layers.spec import Lora
from mlperf_tutor.layers.tf_norms import NORMS, RMSNorm, make_norm  # noqa: F401 (re-exported)
from mlperf_tutor.layers.tf_rotary import (  # noqa: F401 (apply_rotary re-exported)
    RotaryLayout,
    apply_rotary,
)
from mlperf_tutor.layers.tf_rotary import math_dtype as _math_dtype

#: Added to the scores of padded keys: the MLPerf BERT reference's value (modeling.py). Not -inf,
#: so a row without any real key still has a finite (uniform) softmax, as in the reference.
KEY_MASK_VALUE = -10000.0
#: Replaces the scores of future keys under ``causal=True``: the most negative float32, so exp()
#: gives exactly 0 whatever padding added before.
CAUSAL_MASK_VALUE = float(np.finfo(np.float32).min)

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_exact(x):
    # PyTorch's formula. Not ops.gelu(approximate=False): tf.nn.gelu casts its constant 1/sqrt(2)
    # through float32, so float64 inputs get errors of 5e-9. A Python float multiplies exactly.
    return 0.5 * x * (1.0 + ops.erf(x * _SQRT_HALF))


def _gelu_tanh(x):
    # PyTorch's tanh approximation, written out for the same reason: tf.nn.gelu's 0.044715 is
    # cast through float32 as well.
    return 0.5 * x * (1.0 + ops.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


#: Activation name -> function; the GELU approximation is always explicit.
ACTIVATIONS = {
    "gelu": _gelu_exact,  # exact, with erf (BERT, GPT-3)
    "gelu_tanh": _gelu_tanh,  # GPT-2, GPT-J (HF gelu_new)
    "relu": ops.relu,
    "silu": ops.silu,
}
Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]


def get_activation(name: str):
    """The activation function called ``name`` (a key of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _dense(units: int, bias: bool, name: str, dtype) -> keras.layers.Dense:
    return keras.layers.Dense(
        units, use_bias=bias, kernel_initializer="zeros", name=name, dtype=dtype
    )


class LoRALinear(keras.layers.Dense):
    """A Dense layer plus a LoRA adapter: ``dense(x) + scaling * lora_b(lora_a(dropout(x)))``.

    A Dense subclass, so the adapter's Dense rule maps ``kernel`` and ``bias`` to the plain
    canonical ``weight`` and ``bias``; the children ``lora_a`` (in -> r) and ``lora_b``
    (r -> out), Dense layers without bias, give ``lora_a.weight`` and ``lora_b.weight``. Not
    Keras' own ``Dense.enable_lora``: its ``lora_kernel_a``/``_b`` are leaves of the Dense
    itself, which freezes its kernel as a side effect and has no adapter dropout. Freezing the
    base is the model's business (``set_trainable`` of the adapter).

    Args:
        units: output width.
        bias: whether the base layer has a bias.
        lora: the adapter's rank, alpha and dropout.
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(self, units: int, *, bias: bool, lora: Lora, **kwargs):
        super().__init__(units, use_bias=bias, kernel_initializer="zeros", **kwargs)
        dtype = self.dtype_policy
        self.scaling = lora.scaling
        self.lora_a = _dense(lora.rank, False, "lora_a", dtype)
        self.lora_b = _dense(units, False, "lora_b", dtype)
        self.lora_dropout = keras.layers.Dropout(lora.dropout, name="lora_dropout", dtype=dtype)

    def build(self, input_shape):
        # All variables at once, so that a built layer can be loaded before its first call.
        super().build(input_shape)
        self.lora_a.build(input_shape)
        self.lora_b.build((*input_shape[:-1], self.lora_a.units))

    def call(self, x, training=False):
        update = self.lora_b(self.lora_a(self.lora_dropout(x, training=training)))  # (..., out)
        return super().call(x) + self.scaling * update


def make_linear(
    name: str, units: int, *, bias: bool, lora: Lora | None, dtype
) -> keras.layers.Dense:
    """A Dense layer called ``name``, or a :class:`LoRALinear` when ``lora`` targets ``name``."""
    if lora is not None and lora.applies_to(name):
        return LoRALinear(units, bias=bias, lora=lora, name=name, dtype=dtype)
    return _dense(units, bias, name, dtype)


class Attention(keras.layers.Layer):
    """Multi-head attention with grouped-query heads, key padding, causality and rotary; self-
    attention, or cross-attention to a ``context`` when ``context_dim`` is set.

    ``scores = q k^T / sqrt(H)``; padded keys get :data:`KEY_MASK_VALUE` (-10000, the BERT
    reference's value) added, future keys are set to :data:`CAUSAL_MASK_VALUE` under ``causal``;
    softmax in float32 (float64 for a float64 layer); dropout on the probabilities; ``o_proj``
    of the heads' outputs. With ``num_kv_heads = K < N``, query head ``n`` uses key/value head
    ``n // (N / K)`` (Llama 2's layout, the order of ``repeat_interleave``). With
    ``rotary_dim > 0``, queries and keys get rotary positions (:func:`apply_rotary`) right after
    their projections, before the heads are repeated and before either path.

    Args:
        dim: model width D (input and output).
        num_heads: query heads N; the head width is H = D / N.
        num_kv_heads: key/value heads K (default N); must divide N.
        bias: biases in the four projections.
        dropout: dropout rate of the attention probabilities.
        causal: each position attends only to itself and earlier ones.
        fused: use ``keras.ops.dot_product_attention`` instead of the explicit einsums. On the
            TensorFlow backend it is the same math in one op (Keras has flash kernels only for
            its JAX and PyTorch backends); it has no attention dropout, so ``dropout`` must be 0.
            The explicit path is the parity reference.
        rotary_dim: dims of each head rotated by :func:`apply_rotary`; 0: no rotary positions.
        rotary_base: the rotary frequency base.
        rotary_layout: "interleaved" (GPT-J) or "half" (Llama) pairs of dims.
        fused_qkv: one ``qkv_proj`` whose output is the N H query dims, then the K H key and
            the K H value dims (the MLPerf Llama 2 checkpoint's layout), instead of three.
        lora: LoRA adapters on the projections it targets (``qkv_proj``, ``o_proj``, ...).
        context_dim: cross-attention: ``k_proj`` and ``v_proj`` read a ``context`` of this width
            (Stable Diffusion's text tokens); None: self-attention.
        out_bias: a bias in ``o_proj``; None: same as ``bias`` (SD: no q/k/v bias, o_proj bias).
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (B, T, D); key_mask: (B, S) of 1 (real key) / 0 (padding), or None; context:
        (B, S, context_dim), given exactly when ``context_dim`` is set (self-attention: S = T).
        Output (B, T, D).
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
        rotary_layout: RotaryLayout = "interleaved",
        fused_qkv: bool = False,
        lora: Lora | None = None,
        context_dim: int | None = None,
        out_bias: bool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if context_dim is not None and (causal or rotary_dim or fused_qkv):
            raise ValueError(
                "cross-attention (context_dim set) takes no causal mask, rotary positions or "
                f"fused_qkv (got causal={causal}, rotary_dim={rotary_dim}, fused_qkv={fused_qkv})"
            )
        self.context_dim = context_dim
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim % num_heads or num_heads % kv_heads:
            raise ValueError(
                f"Attention needs dim ({dim}) divisible by num_heads ({num_heads}) and num_heads "
                f"divisible by num_kv_heads ({kv_heads})"
            )
        if fused and dropout:
            raise ValueError(
                "fused attention (keras.ops.dot_product_attention) has no attention-probability "
                f"dropout; pass dropout=0.0 (got {dropout}) or fused=False"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, kv_heads, dim // num_heads
        if rotary_dim and not (0 < rotary_dim <= self.head_dim and rotary_dim % 2 == 0):
            raise ValueError(
                f"rotary_dim ({rotary_dim}) must be even and in (0, head dim {self.head_dim}]"
            )
        if rotary_layout not in ("interleaved", "half"):
            raise ValueError(
                f"rotary_layout must be 'interleaved' or 'half', got {rotary_layout!r}"
            )
        self.causal, self.fused = causal, fused
        self.rotary_dim, self.rotary_base, self.rotary_layout = (
            rotary_dim, float(rotary_base), rotary_layout,
        )  # fmt: skip
        dtype, kv_dim = self.dtype_policy, kv_heads * self.head_dim
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv_proj = make_linear("qkv_proj", dim + 2 * kv_dim, bias=bias, lora=lora,
                                        dtype=dtype)  # fmt: skip
        else:
            self.q_proj = make_linear("q_proj", dim, bias=bias, lora=lora, dtype=dtype)
            self.k_proj = make_linear("k_proj", kv_dim, bias=bias, lora=lora, dtype=dtype)
            self.v_proj = make_linear("v_proj", kv_dim, bias=bias, lora=lora, dtype=dtype)
        o_bias = bias if out_bias is None else out_bias
        self.o_proj = make_linear("o_proj", dim, bias=o_bias, lora=lora, dtype=dtype)
        self.dropout = keras.layers.Dropout(dropout, name="dropout", dtype=dtype)

    def _keys(self, x, training):
        # Without rotary, the key bias adds q . b to every score of a query alike, which softmax
        # ignores: its gradient is exactly zero. Computed through the graph it is round-off
        # (~1e-12) that differs between frameworks and that Adam (eps 1e-8) amplifies into
        # visible drift, so the bias enters the keys as a constant: same forward, exact zero.
        if not self.k_proj.use_bias or self.rotary_dim or isinstance(self.k_proj, LoRALinear):
            return self.k_proj(x, training=training)
        if not self.k_proj.built:
            self.k_proj.build(x.shape)
        return ops.matmul(x, self.k_proj.kernel) + ops.stop_gradient(self.k_proj.bias)

    def call(self, x, key_mask=None, context=None, training=False):
        if (context is None) != (self.context_dim is None):
            raise ValueError(
                f"Attention {self.name!r} needs a context exactly when it was built with "
                f"context_dim (context_dim={self.context_dim}, context given: "
                f"{context is not None})"
            )
        b, t = ops.shape(x)[:2]  # tensors, not ints, inside a shape-relaxed tf.function
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        q, keys, values = self._project(x, x if context is None else context, training)
        s = ops.shape(keys)[1]
        q = ops.reshape(q, (b, t, n, h))  # (B, T, N, H)
        keys = ops.reshape(keys, (b, s, k, h))  # (B, S, K, H); self-attention: S = T
        values = ops.reshape(values, (b, s, k, h))  # (B, S, K, H)
        if self.rotary_dim:
            q = self._rotate(q)
            keys = self._rotate(keys)
        if k != n:  # each kv head serves n // k consecutive query heads
            keys = ops.repeat(keys, n // k, axis=2)  # (B, S, N, H)
            values = ops.repeat(values, n // k, axis=2)  # (B, S, N, H)
        pad = None
        if key_mask is not None:
            mask = ops.cast(key_mask, _math_dtype(self.compute_dtype))
            pad = (1.0 - mask) * KEY_MASK_VALUE  # (B, S)
        if self.fused:
            out = ops.dot_product_attention(
                q, keys, values, bias=None if pad is None else pad[:, None, None, :],
                scale=1.0 / math.sqrt(h), is_causal=self.causal,
            )  # fmt: skip
        else:
            out = self._explicit(q, keys, values, pad, training)  # (B, T, N, H)
        return self.o_proj(ops.reshape(out, (b, t, n * h)), training=training)  # (B, T, D)

    def _project(self, x, source, training):
        # (B, T, N H), (B, S, K H), (B, S, K H): keys and values from ``source`` (x, or the
        # context of cross-attention); ``training`` reaches LoRA's dropout.
        if self.fused_qkv:
            q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            qkv = self.qkv_proj(x, training=training)
            return ops.split(qkv, [q_dim, q_dim + kv_dim], axis=-1)
        keys = self._keys(source, training)
        return self.q_proj(x, training=training), keys, self.v_proj(source, training=training)

    def _rotate(self, x):
        return apply_rotary(x, self.rotary_dim, self.rotary_base, self.rotary_layout)

    def _explicit(self, q, keys, values, pad, training):
        # Scaled after the product, as the BERT reference and transformers' eager path do.
        scores = ops.einsum("BTNH,BSNH->BNTS", q, keys) * (1.0 / math.sqrt(self.head_dim))
        # float32 scores at least: in bfloat16 the -10000 mask would swamp them.
        scores = ops.cast(scores, _math_dtype(self.compute_dtype))  # (B, N, T, S)
        if pad is not None:
            scores = scores + pad[:, None, None, :]
        if self.causal:
            t = ops.shape(q)[1]
            future = ops.arange(t)[:, None] < ops.arange(t)[None, :]  # (T, S)
            scores = ops.where(future, CAUSAL_MASK_VALUE, scores)
        probs = ops.cast(ops.softmax(scores, axis=-1), self.compute_dtype)
        probs = self.dropout(probs, training=training)  # (B, N, T, S)
        return ops.einsum("BNTS,BSNH->BTNH", probs, values)  # (B, T, N, H)


class MLP(keras.layers.Layer):
    """Feed-forward network: ``fc_out(dropout(activation(fc_in(x))))``, or with ``gated``
    (SwiGLU with "silu", as Llama: ``gate_proj`` = ``fc_gate``, ``up_proj`` = ``fc_in``,
    ``down_proj`` = ``fc_out``) ``fc_out(dropout(activation(fc_gate(x)) * fc_in(x)))``.

    The dropout acts on the hidden activations (as in Stable Diffusion's feed-forward); BERT and
    GPT have none there: :class:`TransformerBlock` drops the MLP's output itself and builds the
    MLP with dropout 0.

    Args:
        dim: input and output width D.
        hidden: hidden width F.
        activation: "gelu" (exact, erf), "gelu_tanh", "relu" or "silu".
        bias: biases in ``fc_in`` and ``fc_out``.
        dropout: dropout rate of the hidden activations.
        gated: a third projection ``fc_gate`` whose activation multiplies ``fc_in(x)``.
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (..., D) -> (..., D).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        activation: Activation = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        gated: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # The function itself, as Keras expects of a layer's ``activation`` (Dense, remat).
        self.activation = get_activation(activation)
        dtype = self.dtype_policy
        self.fc_gate = _dense(hidden, bias, "fc_gate", dtype) if gated else None
        self.fc_in = _dense(hidden, bias, "fc_in", dtype)
        self.fc_out = _dense(dim, bias, "fc_out", dtype)
        self.dropout = keras.layers.Dropout(dropout, name="dropout", dtype=dtype)

    def call(self, x, training=False):
        if self.fc_gate is None:
            h = self.activation(self.fc_in(x))  # (..., F)
        else:
            h = self.activation(self.fc_gate(x)) * self.fc_in(x)  # (..., F)
        return self.fc_out(self.dropout(h, training=training))  # (..., D)


class TransformerBlock(keras.layers.Layer):
    """Attention and MLP, each in a residual branch, with LayerNorms (or RMSNorms).

    * ``norm_position="post"`` (BERT): ``x = attention_norm(x + drop(attention(x, key_mask)))``;
      ``x = mlp_norm(x + drop(mlp(x)))``.
    * ``norm_position="pre"`` (GPT): ``x = x + drop(attention(attention_norm(x), key_mask))``;
      ``x = x + drop(mlp(mlp_norm(x)))``.
    * ``norm_position="parallel"`` (GPT-J; Wang & Komatsuzaki 2021,
      https://github.com/kingoflolz/mesh-transformer-jax): one norm, no ``mlp_norm``:
      ``h = attention_norm(x)``; ``x = x + drop(attention(h, key_mask)) + drop(mlp(h))``.
    * With ``context_dim`` (Stable Diffusion; pre-norm only), a cross-attention branch between
      the two: ``x = x + drop(cross_attention(cross_attention_norm(x), context))``.

    Args:
        dim: model width D.
        num_heads: attention heads N.
        ffn: MLP hidden width F.
        norm_eps: LayerNorm epsilon (always explicit: the defaults differ between frameworks).
        norm_position: "post", "pre" or "parallel".
        activation: the MLP's activation (see :class:`MLP`).
        bias: biases in the MLP, and in the attention projections unless ``attention_bias``
            says otherwise.
        attention_bias: biases in the attention projections; None: same as ``bias``.
        dropout: dropout rate of the attention and MLP outputs before the residual sum.
        attention_dropout: dropout rate of the attention probabilities.
        causal: causal self-attention.
        fused: the attention's fused path (see :class:`Attention`).
        rotary_dim: rotary dims of the attention's heads (0: none; see :func:`apply_rotary`).
        rotary_base: the rotary frequency base.
        rotary_layout: "interleaved" or "half".
        num_kv_heads: grouped-query attention's key/value heads (None: ``num_heads``).
        norm: "layernorm" (``gamma`` and ``beta``) or "rmsnorm" (``scale``; Llama).
        gated_mlp: a gated MLP (SwiGLU with "silu"; see :class:`MLP`).
        fused_qkv: one fused query/key/value projection (see :class:`Attention`).
        lora: LoRA adapters on the attention projections it targets.
        context_dim: width of the context that ``cross_attention`` reads (None: no
            cross-attention and no ``cross_attention_norm``).
        attention_out_bias: a bias in the attention's ``o_proj`` (and the cross-attention's);
            None: same as ``attention_bias``.
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (B, T, D); key_mask: (B, T) of 1/0 or None; context: (B, L, context_dim), given
        exactly when ``context_dim`` is set. Output (B, T, D).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: int,
        *,
        norm_eps: float,
        norm_position: Literal["post", "pre", "parallel"] = "post",
        activation: Activation = "gelu",
        bias: bool = True,
        attention_bias: bool | None = None,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        causal: bool = False,
        fused: bool = False,
        rotary_dim: int = 0,
        rotary_base: float = 10000.0,
        rotary_layout: RotaryLayout = "interleaved",
        num_kv_heads: int | None = None,
        norm: str = "layernorm",
        gated_mlp: bool = False,
        fused_qkv: bool = False,
        lora: Lora | None = None,
        context_dim: int | None = None,
        attention_out_bias: bool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if norm_position not in ("post", "pre", "parallel"):
            raise ValueError(
                f"norm_position must be 'post', 'pre' or 'parallel', got {norm_position!r}"
            )
        if context_dim is not None and norm_position != "pre":
            raise ValueError(
                f"cross-attention (context_dim={context_dim}) needs norm_position='pre', got "
                f"{norm_position!r}"
            )
        self.norm_position = norm_position
        dtype = self.dtype_policy
        attention_bias = bias if attention_bias is None else attention_bias
        self.attention = Attention(
            dim, num_heads, bias=attention_bias, out_bias=attention_out_bias,
            dropout=attention_dropout, causal=causal, fused=fused, rotary_dim=rotary_dim,
            rotary_base=rotary_base, rotary_layout=rotary_layout, num_kv_heads=num_kv_heads,
            fused_qkv=fused_qkv, lora=lora, name="attention", dtype=dtype,
        )  # fmt: skip
        self.attention_norm = make_norm(norm, norm_eps, name="attention_norm", dtype=dtype)
        self.cross_attention = None
        if context_dim is not None:
            self.cross_attention = Attention(
                dim, num_heads, bias=attention_bias, out_bias=attention_out_bias,
                dropout=attention_dropout, fused=fused, num_kv_heads=num_kv_heads, lora=lora,
                context_dim=context_dim, name="cross_attention", dtype=dtype,
            )  # fmt: skip
            self.cross_attention_norm = make_norm(
                norm, norm_eps, name="cross_attention_norm", dtype=dtype
            )
        self.mlp = MLP(
            dim, ffn, activation=activation, bias=bias, dropout=0.0, gated=gated_mlp, name="mlp",
            dtype=dtype,
        )  # fmt: skip
        if norm_position != "parallel":  # the parallel block's MLP reads attention_norm's output
            self.mlp_norm = make_norm(norm, norm_eps, name="mlp_norm", dtype=dtype)
        self.dropout = keras.layers.Dropout(dropout, name="dropout", dtype=dtype)

    def call(self, x, key_mask=None, context=None, training=False):
        if context is not None and self.cross_attention is None:
            raise ValueError(f"block {self.name!r} has no cross-attention (context_dim unset)")

        def drop(y):
            return self.dropout(y, training=training)

        if self.norm_position == "parallel":
            h = self.attention_norm(x)
            attended = drop(self.attention(h, key_mask, training=training))
            return x + attended + drop(self.mlp(h, training=training))
        if self.norm_position == "pre":
            x = x + drop(self.attention(self.attention_norm(x), key_mask, training=training))
            if self.cross_attention is not None:
                h = self.cross_attention_norm(x)
                x = x + drop(self.cross_attention(h, context=context, training=training))
            return x + drop(self.mlp(self.mlp_norm(x), training=training))
        x = self.attention_norm(x + drop(self.attention(x, key_mask, training=training)))
        return self.mlp_norm(x + drop(self.mlp(x, training=training)))

"""Keras building blocks that the workloads share, with the numbers of the PyTorch versions.

Built-in Keras layers are used wherever they compute the same numbers as PyTorch given explicit
arguments (Dense, Conv with explicit padding, Embedding, LayerNormalization, GroupNormalization).
This module adds what Keras lacks or computes differently:

* :class:`BatchNorm`: PyTorch's momentum convention and unbiased running variance.
* :class:`Attention`, :class:`MLP`, :class:`TransformerBlock`: the transformer blocks of BERT,
  GPT-3, GPT-J, Llama 2 and Stable Diffusion, with the class, attribute and argument names of
  ``torch_layers`` and ``jax_layers``. Attention: Vaswani et al. 2017
  (https://arxiv.org/abs/1706.03762); grouped-query attention: Ainslie et al. 2023
  (https://arxiv.org/abs/2305.13245); pre-LN: Xiong et al. 2020 (https://arxiv.org/abs/2002.04745).

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


class BatchNorm(keras.layers.Layer):
    """Batch normalisation with ``torch.nn.BatchNorm{1,2,3}d`` semantics.

    Differences from ``keras.layers.BatchNormalization``, which this replaces for parity:

    * ``momentum`` follows PyTorch: ``running = (1 - momentum) * running + momentum * batch``.
      Keras weights the other way round (its default 0.99 is PyTorch's 0.01).
    * The running variance is updated with the unbiased batch variance (``n / (n - 1)`` times the
      biased one), as PyTorch does; Keras stores the biased variance. Normalisation in training
      uses the biased variance in both.
    * No ``center``/``scale`` switches, no renorm, no virtual batches: one behaviour only.

    Statistics of float16/bfloat16 inputs are computed in float32 (PyTorch's opmath type).
    Variables keep Keras' leaf names (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``);
    ``canonical_leaves`` maps them to PyTorch's ``weight``, ``bias``, ``running_mean``,
    ``running_var``.

    Args:
        momentum: PyTorch momentum (0.1 in ``torch.nn.BatchNorm2d``).
        epsilon: added to the variance (1e-5 in PyTorch).
        axis: the channel axis (-1 for channels-last inputs).
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        Input and output: any rank >= 2; statistics are per index of ``axis``.
    """

    canonical_leaves = {
        "gamma": "weight",
        "beta": "bias",
        "moving_mean": "running_mean",
        "moving_variance": "running_var",
    }

    def __init__(self, momentum: float, epsilon: float, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.axis = axis

    def build(self, input_shape):
        channels = (int(input_shape[self.axis]),)
        self.gamma = self.add_weight(shape=channels, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=channels, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(
            shape=channels, initializer="zeros", trainable=False, name="moving_mean"
        )
        self.moving_variance = self.add_weight(
            shape=channels, initializer="ones", trainable=False, name="moving_variance"
        )

    def _broadcast(self, v, ndim: int):
        shape = [1] * ndim
        shape[self.axis] = -1
        return ops.reshape(v, shape)

    def call(self, x, training=False):
        ndim = len(x.shape)
        axis = self.axis % ndim
        reduce_axes = [i for i in range(ndim) if i != axis]
        in_dtype = keras.backend.standardize_dtype(x.dtype)
        stats_dtype = "float32" if in_dtype in ("float16", "bfloat16") else in_dtype
        xs = ops.cast(x, stats_dtype)
        if training:
            count = math.prod(int(x.shape[i]) for i in reduce_axes)
            if count < 2:
                raise ValueError(
                    f"BatchNorm {self.name!r} got {count} value per channel in training; use a "
                    "batch with more than one value per channel or call it with training=False"
                )
            mean = ops.mean(xs, axis=reduce_axes)
            # Two-pass variance (as PyTorch): mean of squared deviations, no E[x^2] - E[x]^2.
            var = ops.mean(ops.square(xs - self._broadcast(mean, ndim)), axis=reduce_axes)
            m = self.momentum
            vdtype = self.moving_mean.dtype
            self.moving_mean.assign((1.0 - m) * self.moving_mean + m * ops.cast(mean, vdtype))
            self.moving_variance.assign(
                (1.0 - m) * self.moving_variance + m * ops.cast(var * (count / (count - 1)), vdtype)
            )
        else:
            mean = ops.cast(self.moving_mean, stats_dtype)
            var = ops.cast(self.moving_variance, stats_dtype)
        inv = ops.rsqrt(var + self.epsilon) * ops.cast(self.gamma, stats_dtype)
        y = (xs - self._broadcast(mean, ndim)) * self._broadcast(inv, ndim) + self._broadcast(
            ops.cast(self.beta, stats_dtype), ndim
        )
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "axis": self.axis,
        }


#: Added to the scores of padded keys: the MLPerf BERT reference's value (modeling.py). Not -inf,
#: so a row without any real key still has a finite (uniform) softmax, as in the reference.
KEY_MASK_VALUE = -10000.0
#: Replaces the scores of future keys under ``causal=True``: the most negative float32, so exp()
#: gives exactly 0 whatever padding added before.
CAUSAL_MASK_VALUE = float(np.finfo(np.float32).min)

#: Activation name -> function; the GELU approximation is always explicit.
ACTIVATIONS = {
    "gelu": lambda x: ops.gelu(x, approximate=False),  # exact, with erf (BERT)
    "gelu_tanh": lambda x: ops.gelu(x, approximate=True),  # GPT-2 / GPT-3 / GPT-J
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


class Attention(keras.layers.Layer):
    """Multi-head self-attention with optional grouped-query heads, key padding and causality.

    ``scores = q k^T / sqrt(H)``; padded keys get :data:`KEY_MASK_VALUE` (-10000, the BERT
    reference's value) added, future keys are set to :data:`CAUSAL_MASK_VALUE` under ``causal``;
    softmax in float32; dropout on the probabilities; ``o_proj`` of the heads' outputs. With
    ``num_kv_heads = K < N``, query head ``n`` uses key/value head ``n // (N / K)`` (Llama 2's
    layout, the order of ``repeat_interleave``).

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
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (B, T, D); key_mask: (B, T) of 1 (real token) / 0 (padding), or None. Output (B, T, D).
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
        **kwargs,
    ):
        super().__init__(**kwargs)
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
        self.causal, self.fused = causal, fused
        dtype = self.dtype_policy
        self.q_proj = _dense(dim, bias, "q_proj", dtype)
        self.k_proj = _dense(kv_heads * self.head_dim, bias, "k_proj", dtype)
        self.v_proj = _dense(kv_heads * self.head_dim, bias, "v_proj", dtype)
        self.o_proj = _dense(dim, bias, "o_proj", dtype)
        self.dropout = keras.layers.Dropout(dropout, name="dropout", dtype=dtype)

    def call(self, x, key_mask=None, training=False):
        b, t = ops.shape(x)[:2]  # tensors, not ints, inside a shape-relaxed tf.function
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        q = ops.reshape(self.q_proj(x), (b, t, n, h))  # (B, T, N, H)
        keys = ops.reshape(self.k_proj(x), (b, t, k, h))  # (B, S, K, H); self-attention: S = T
        values = ops.reshape(self.v_proj(x), (b, t, k, h))  # (B, S, K, H)
        if k != n:  # each kv head serves n // k consecutive query heads
            keys = ops.repeat(keys, n // k, axis=2)  # (B, S, N, H)
            values = ops.repeat(values, n // k, axis=2)  # (B, S, N, H)
        pad = None
        if key_mask is not None:
            pad = (1.0 - ops.cast(key_mask, "float32")) * KEY_MASK_VALUE  # (B, S)
        if self.fused:
            out = ops.dot_product_attention(
                q, keys, values, bias=None if pad is None else pad[:, None, None, :],
                scale=1.0 / math.sqrt(h), is_causal=self.causal,
            )  # fmt: skip
        else:
            out = self._explicit(q, keys, values, pad, training)  # (B, T, N, H)
        return self.o_proj(ops.reshape(out, (b, t, n * h)))  # (B, T, D)

    def _explicit(self, q, keys, values, pad, training):
        # Scaled after the product, as the BERT reference and transformers' eager path do.
        scores = ops.einsum("BTNH,BSNH->BNTS", q, keys) * (1.0 / math.sqrt(self.head_dim))
        # float32 scores: in bfloat16 the -10000 mask would swamp them.
        scores = ops.cast(scores, "float32")  # (B, N, T, S)
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
    """Two-layer feed-forward network: ``fc_out(dropout(activation(fc_in(x))))``.

    The dropout acts on the hidden activations (as in Stable Diffusion's feed-forward); BERT and
    GPT have none there: :class:`TransformerBlock` drops the MLP's output itself and builds the
    MLP with dropout 0.

    Args:
        dim: input and output width D.
        hidden: hidden width F.
        activation: "gelu" (exact, erf), "gelu_tanh", "relu" or "silu".
        bias: biases in ``fc_in`` and ``fc_out``.
        dropout: dropout rate of the hidden activations.
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
        **kwargs,
    ):
        super().__init__(**kwargs)
        # The function itself, as Keras expects of a layer's ``activation`` (Dense, remat).
        self.activation = get_activation(activation)
        dtype = self.dtype_policy
        self.fc_in = _dense(hidden, bias, "fc_in", dtype)
        self.fc_out = _dense(dim, bias, "fc_out", dtype)
        self.dropout = keras.layers.Dropout(dropout, name="dropout", dtype=dtype)

    def call(self, x, training=False):
        h = self.dropout(self.activation(self.fc_in(x)), training=training)  # (..., F)
        return self.fc_out(h)  # (..., D)


class TransformerBlock(keras.layers.Layer):
    """Attention then MLP, each with a residual connection and a LayerNorm.

    * ``norm_position="post"`` (BERT): ``x = attention_norm(x + drop(attention(x, key_mask)))``;
      ``x = mlp_norm(x + drop(mlp(x)))``.
    * ``norm_position="pre"`` (GPT): ``x = x + drop(attention(attention_norm(x), key_mask))``;
      ``x = x + drop(mlp(mlp_norm(x)))``.

    Args:
        dim: model width D.
        num_heads: attention heads N.
        ffn: MLP hidden width F.
        norm_eps: LayerNorm epsilon (always explicit: the defaults differ between frameworks).
        norm_position: "post" or "pre".
        activation: the MLP's activation (see :class:`MLP`).
        bias: biases in the attention projections and the MLP.
        dropout: dropout rate of the attention and MLP outputs before the residual sum.
        attention_dropout: dropout rate of the attention probabilities.
        causal: causal self-attention.
        fused: the attention's fused path (see :class:`Attention`).
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (B, T, D); key_mask: (B, T) of 1/0 or None. Output (B, T, D).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: int,
        *,
        norm_eps: float,
        norm_position: Literal["post", "pre"] = "post",
        activation: Activation = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        causal: bool = False,
        fused: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if norm_position not in ("post", "pre"):
            raise ValueError(f"norm_position must be 'post' or 'pre', got {norm_position!r}")
        self.norm_position = norm_position
        dtype = self.dtype_policy
        self.attention = Attention(
            dim, num_heads, bias=bias, dropout=attention_dropout, causal=causal, fused=fused,
            name="attention", dtype=dtype,
        )  # fmt: skip
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=norm_eps, name="attention_norm", dtype=dtype
        )
        self.mlp = MLP(
            dim, ffn, activation=activation, bias=bias, dropout=0.0, name="mlp", dtype=dtype
        )
        self.mlp_norm = keras.layers.LayerNormalization(
            epsilon=norm_eps, name="mlp_norm", dtype=dtype
        )
        self.dropout = keras.layers.Dropout(dropout, name="dropout", dtype=dtype)

    def call(self, x, key_mask=None, training=False):
        def drop(y):
            return self.dropout(y, training=training)

        if self.norm_position == "pre":
            x = x + drop(self.attention(self.attention_norm(x), key_mask, training=training))
            return x + drop(self.mlp(self.mlp_norm(x), training=training))
        x = self.attention_norm(x + drop(self.attention(x, key_mask, training=training)))
        return self.mlp_norm(x + drop(self.mlp(x, training=training)))

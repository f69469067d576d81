"""Keras normalisation layers with PyTorch's numbers, shared by the workloads.

* :class:`BatchNorm`: batch normalisation (Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167)
  with ``torch.nn.BatchNorm{1,2,3}d``'s momentum convention and unbiased running variance, which
  Keras' ``BatchNormalization`` computes differently.
* :class:`RMSNorm`: root-mean-square norm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467)
  as Llama computes it; :func:`make_norm` picks it or a LayerNorm by name.
"""

from __future__ import annotations

import math

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
from keras import ops

from mlperf_tutor.layers.spec import check_norm


class BatchNorm(keras.layers.Layer):
    """Batch normalisation with ``torch.nn.BatchNorm{1,2,3}d`` semantics.

    Differences from ``keras.layers.BatchNormalization``, which this replaces for parity:

    * ``momentum`` follows PyTorch: ``running = (1 - momentum) * running + momentum * batch``.
      Keras weights the other way round (its default 0.99 is PyTorch's 0.01).
    * The running variance is updated with the unbiased batch variance (``n / (n - 1)`` times the
      biased one), as PyTorch does; Keras stores the biased variance. Normalisation in training
      uses the biased variance in both.
    * No ``center``/``scale`` switches, no renorm, no virtual batches: one behaviour only.

    Statistics of float16/bfloat16 inputs are computed in float32 (PyTorch's opmath type), with
    the variables read in their own dtype (float32 under ``mixed_bfloat16``), never autocast.
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
        # autocast=False: under a mixed policy (float32 variables, bfloat16 compute) Keras would
        # hand every read over in bfloat16; the statistics here are float32 math, and the
        # running averages must not be rounded to bfloat16 at each update.
        weight = {"shape": channels, "autocast": False}
        self.gamma = self.add_weight(initializer="ones", name="gamma", **weight)
        self.beta = self.add_weight(initializer="zeros", name="beta", **weight)
        self.moving_mean = self.add_weight(
            initializer="zeros", trainable=False, name="moving_mean", **weight
        )
        self.moving_variance = self.add_weight(
            initializer="ones", trainable=False, name="moving_variance", **weight
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


class RMSNorm(keras.layers.Layer):
    """Root-mean-square norm over the last axis as Llama (and ``layers/torch``'s RMSNorm) computes
    it: in float32 at least, ``x * rsqrt(mean(x**2) + eps)``, cast back to the input dtype, then
    times ``scale``.

    Not ``keras.layers.RMSNormalization``: that one multiplies by the scale before casting back,
    which differs from Llama for bfloat16 inputs. The variable keeps Keras' name ``scale``;
    ``canonical_leaves`` maps it to PyTorch's ``weight``.

    Args:
        epsilon: added to the mean square (always explicit: 1e-5 in Llama 2).
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        Input and output: (..., D); ``scale`` is (D,).
    """

    canonical_leaves = {"scale": "weight"}

    def __init__(self, epsilon: float, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(int(input_shape[-1]),), initializer="ones", name="scale"
        )

    def call(self, x):
        in_dtype = keras.backend.standardize_dtype(x.dtype)
        h = ops.cast(x, keras.backend.result_type(in_dtype, "float32"))  # float64 stays
        h = h * ops.rsqrt(ops.mean(ops.square(h), axis=-1, keepdims=True) + self.epsilon)
        return ops.cast(h, in_dtype) * self.scale

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


def make_norm(kind: str, epsilon: float, **kwargs) -> keras.layers.Layer:
    """A LayerNorm with ``gamma`` and ``beta`` ("layernorm") or an :class:`RMSNorm`
    ("rmsnorm"); ``kwargs`` are Keras layer arguments (``name``, ``dtype``). Keras builds the
    width from the first input, so unlike the torch ``make_norm`` it takes no ``dim``."""
    check_norm(kind)
    if kind == "layernorm":
        return keras.layers.LayerNormalization(epsilon=epsilon, **kwargs)
    return RMSNorm(epsilon, **kwargs)

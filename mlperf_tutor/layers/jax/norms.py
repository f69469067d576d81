"""Flax NNX normalisation with PyTorch's numbers, shared by the workloads.

:class:`BatchNorm`: batch normalisation (Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167)
with the semantics of ``torch.nn.BatchNorm{1,2,3}d``, which ``nnx.BatchNorm`` lacks.
:class:`RMSNorm`: root-mean-square norm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467)
as Llama 2 computes it (the rounding of ``layers/torch/norms.py``'s ``RMSNorm``, which
``nnx.RMSNorm`` does not reproduce in half precision). :func:`make_norm`: a transformer block's
norm by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlperf_tutor.frameworks.jax import BATCHNORM_RULES, NORM_RULES, register_rules
from mlperf_tutor.layers.spec import check_norm


class BatchNorm(nnx.Module):
    """Batch normalisation with PyTorch's semantics and Flax's leaf names.

    Differs from ``nnx.BatchNorm`` in two numbers: ``momentum`` is PyTorch's (weight of the new
    batch, ``running = (1 - m) * running + m * batch``; see
    ``mlperf_tutor.frameworks.jax.flip_bn_momentum``), and ``var`` is updated with the unbiased
    batch variance (``n / (n - 1)``) while the batch itself is normalised with the biased one.
    Leaves: ``scale``, ``bias`` (``nnx.Param``), ``mean``, ``var`` (``nnx.BatchStat``), mapped to
    ``weight``, ``bias``, ``running_mean``, ``running_var``. ``model.train()`` / ``model.eval()``
    switch ``use_running_average``.

    Args:
        num_features: size of the feature axis.
        momentum: PyTorch-convention momentum (0.1 in PyTorch).
        epsilon: added to the variance (1e-5 in PyTorch).
        use_running_average: normalise with the running statistics (eval mode).
        axis: the feature axis (-1: channels-last).
        param_dtype: dtype of the four leaves.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float,
        epsilon: float,
        use_running_average: bool = False,
        axis: int = -1,
        param_dtype=jnp.float32,
    ):
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.axis = axis

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: set ``use_running_average`` when given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        axis = self.axis % x.ndim
        reduce = tuple(i for i in range(x.ndim) if i != axis)
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        # Statistics in at least float32, as PyTorch does for half-precision inputs.
        xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            mean, var = self.mean[...].astype(xs.dtype), self.var[...].astype(xs.dtype)
        else:
            n = x.size // x.shape[axis]
            if n < 2:
                raise ValueError(
                    f"BatchNorm in train mode needs more than 1 value per channel, got input "
                    f"shape {x.shape}; use a larger batch or call model.eval()"
                )
            mean = xs.mean(reduce)
            var = jnp.square(xs - mean.reshape(shape)).mean(reduce)  # two-pass, biased
            m = self.momentum
            stat = jax.lax.stop_gradient
            new_mean = (1.0 - m) * self.mean[...] + m * stat(mean)
            new_var = (1.0 - m) * self.var[...] + m * stat(var) * (n / (n - 1))
            self.mean[...] = new_mean.astype(self.mean.dtype)
            self.var[...] = new_var.astype(self.var.dtype)
        y = (xs - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + self.epsilon)
        y = y * self.scale[...].reshape(shape) + self.bias[...].reshape(shape)
        return y.astype(jnp.result_type(x.dtype, self.scale.dtype))


register_rules(BatchNorm, BATCHNORM_RULES)


class RMSNorm(nnx.Module):
    """Root-mean-square norm as Llama computes it: in float32 at least,
    ``x * rsqrt(mean(x**2) + eps)``, cast back to the input dtype, then times ``scale``.

    ``nnx.RMSNorm`` multiplies by the scale before the cast back, which rounds differently in
    bfloat16. Leaf: ``scale`` (``nnx.Param``, ones), mapped to ``weight``.

    Args:
        dim: normalised (last) dimension D.
        eps: added to the mean square (always explicit: 1e-5 in Llama 2).
        param_dtype: dtype of ``scale``.
    """

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * h.astype(x.dtype)  # (..., D)


register_rules(RMSNorm, NORM_RULES)


def make_norm(kind: str, dim: int, eps: float, *, rngs: nnx.Rngs) -> nnx.Module:
    """A LayerNorm with scale and bias ("layernorm") or an :class:`RMSNorm` ("rmsnorm") over the
    last dimension D (a ``BlockSpec``'s ``norm``)."""
    check_norm(kind)
    if kind == "layernorm":
        # Two-pass variance, as PyTorch computes it (Flax's default is E[x^2] - E[x]^2).
        return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)
    return RMSNorm(dim, eps)

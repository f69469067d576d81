"""The op table, part 2: reductions, sorting and matrix products.

Reductions over ``dim=None`` or ``[]`` cover every dim (ATen's convention); integer and bool
sums accumulate in int64 as PyTorch's do; products of bf16/fp16 accumulate in float32. Conventions
as in :mod:`.aten_ops`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mlperf_tutor.migrate.aten_ops import as_float, aten, dims_of, is_float, jax_dtype, opmath, wide

# --- reductions -----------------------------------------------------------------------------


@aten("sum.dim_IntList", "sum.default")
def _sum(x, dim=None, keepdim=False, *, dtype=None):
    if dtype is None and not is_float(x):  # bool and ints accumulate in int64
        dtype = jnp.int64
    return jnp.sum(x, axis=dims_of(dim, x.ndim), keepdims=keepdim, dtype=jax_dtype(dtype))


@aten("mean.dim", "mean.default")
def _mean(x, dim=None, keepdim=False, *, dtype=None):
    return jnp.mean(x, axis=dims_of(dim, x.ndim), keepdims=keepdim, dtype=jax_dtype(dtype))


@aten("prod.default", "prod.dim_int")
def _prod(x, dim=None, keepdim=False, *, dtype=None):
    return jnp.prod(x, axis=dims_of(dim, x.ndim), keepdims=keepdim, dtype=jax_dtype(dtype))


@aten("amax.default")
def _amax(x, dim=(), keepdim=False):
    return jnp.max(x, axis=dims_of(dim, x.ndim), keepdims=keepdim)


@aten("amin.default")
def _amin(x, dim=(), keepdim=False):
    return jnp.min(x, axis=dims_of(dim, x.ndim), keepdims=keepdim)


@aten("max.default")
def _max_all(x):
    return jnp.max(x)


@aten("min.default")
def _min_all(x):
    return jnp.min(x)


def _scalar_dim(x):
    """A 0-d tensor reduced over dim 0 or -1 (PyTorch allows it) is itself, index 0."""
    return x, jnp.zeros((), jnp.int32)


@aten("max.dim")
def _max_dim(x, dim, keepdim=False):
    if x.ndim == 0:
        return _scalar_dim(x)
    return jnp.max(x, axis=dim, keepdims=keepdim), jnp.argmax(x, axis=dim, keepdims=keepdim)


@aten("min.dim")
def _min_dim(x, dim, keepdim=False):
    if x.ndim == 0:
        return _scalar_dim(x)
    return jnp.min(x, axis=dim, keepdims=keepdim), jnp.argmin(x, axis=dim, keepdims=keepdim)


@aten("argmax.default")
def _argmax(x, dim=None, keepdim=False):
    if x.ndim == 0:
        return jnp.zeros((), jnp.int32)
    return jnp.argmax(x, axis=dim, keepdims=keepdim)


@aten("argmin.default")
def _argmin(x, dim=None, keepdim=False):
    if x.ndim == 0:
        return jnp.zeros((), jnp.int32)
    return jnp.argmin(x, axis=dim, keepdims=keepdim)


@aten("var.correction", "var.dim")
def _var(x, dim=None, unbiased=None, keepdim=False, *, correction=None):
    if correction is None:  # var.dim passes ``unbiased``; var.correction ``correction``
        correction = 1 if unbiased is None or unbiased is True else 0
    return jnp.var(x, axis=dims_of(dim, x.ndim), ddof=correction, keepdims=keepdim)


@aten("std.correction", "std.dim")
def _std(x, dim=None, unbiased=None, keepdim=False, *, correction=None):
    return jnp.sqrt(_var(x, dim, unbiased, keepdim, correction=correction))


@aten("var_mean.correction")
def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    var = _var(x, dim, keepdim=keepdim, correction=correction)
    return var, jnp.mean(x, axis=dims_of(dim, x.ndim), keepdims=keepdim)


@aten("any.default", "any.dim", "any.dims")
def _any(x, dim=None, keepdim=False):
    return jnp.any(x, axis=dims_of(dim, x.ndim), keepdims=keepdim)


@aten("all.default", "all.dim", "all.dims")
def _all(x, dim=None, keepdim=False):
    return jnp.all(x, axis=dims_of(dim, x.ndim), keepdims=keepdim)


@aten("cumsum.default")
def _cumsum(x, dim, *, dtype=None):
    if dtype is None and not is_float(x):
        dtype = jnp.int64
    if x.ndim == 0:
        return x.astype(jax_dtype(dtype) or x.dtype)
    return jnp.cumsum(*opmath(x), axis=dim, dtype=jax_dtype(dtype))


@aten("cumprod.default")
def _cumprod(x, dim, *, dtype=None):
    if x.ndim == 0:
        return x.astype(jax_dtype(dtype) or x.dtype)
    return jnp.cumprod(*opmath(x), axis=dim, dtype=jax_dtype(dtype))


@aten("logcumsumexp.default")
def _logcumsumexp(x, dim):
    if x.ndim == 0:
        return as_float(x)
    return lax.cumlogsumexp(*opmath(as_float(x)), axis=dim % max(x.ndim, 1))


@aten("logsumexp.default")
def _logsumexp(x, dim, keepdim=False):
    return jax.nn.logsumexp(as_float(x), axis=dims_of(dim, x.ndim), keepdims=keepdim)


@aten("linalg_vector_norm.default")
def _vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None):  # noqa: A002
    x = jnp.abs(x if dtype is None else x.astype(jax_dtype(dtype)))
    axis = dims_of(dim, x.ndim)
    if ord == math.inf:
        return jnp.max(x, axis=axis, keepdims=keepdim)
    if ord == -math.inf:
        return jnp.min(x, axis=axis, keepdims=keepdim)
    if ord == 0:
        return jnp.sum(x != 0, axis=axis, keepdims=keepdim).astype(x.dtype)
    if ord == 1:
        return jnp.sum(x, axis=axis, keepdims=keepdim)
    total = jnp.sum(jnp.square(x) if ord == 2 else x**ord, axis=axis, keepdims=keepdim)
    # PyTorch's gradient of a zero norm is zero, not the NaN that d sqrt(s)/ds at 0 gives.
    safe = jnp.where(total > 0, total, 1)
    return jnp.where(total > 0, jnp.sqrt(safe) if ord == 2 else safe ** (1 / ord), 0)


@aten("sort.default", "sort.stable")
def _sort(x, dim=-1, descending=False, *, stable=False):
    key = -x if descending and not jnp.issubdtype(x.dtype, jnp.bool_) else x
    indices = jnp.argsort(key, axis=dim, stable=True)
    return jnp.take_along_axis(x, indices, axis=dim), indices


@aten("topk.default")
def _topk(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002
    moved = jnp.moveaxis(x, dim, -1)
    values, indices = lax.top_k(moved if largest else -moved, k)
    values = values if largest else -values
    return jnp.moveaxis(values, -1, dim), jnp.moveaxis(indices, -1, dim)


# --- matrix products ------------------------------------------------------------------------


@aten("mm.default", "bmm.default", "matmul.default", "mv.default", "dot.default")
def _matmul(a, b):
    return jnp.matmul(a, b, preferred_element_type=wide(a, b))


@aten("addmm.default", "baddbmm.default", "addmv.default")
def _addmm(bias, a, b, *, beta=1, alpha=1):
    product = jnp.matmul(a, b, preferred_element_type=wide(a, b))
    product = product if alpha == 1 else alpha * product
    return product + (bias if beta == 1 else beta * bias) if beta != 0 else product


@aten("linear.default")
def _linear(x, weight, bias=None):
    y = jnp.matmul(x, weight.T, preferred_element_type=wide(x, weight))
    return y if bias is None else y + bias


@aten("einsum.default")
def _einsum(equation, tensors, *, path=None):
    return jnp.einsum(equation, *tensors, preferred_element_type=wide(*tensors))


# --- distances and Fourier transforms -------------------------------------------------------


def _p_norm(diff, p, axis):
    """The p-norm of ``diff`` along ``axis``, with a zero (not NaN) gradient at zero."""
    diff = jnp.abs(diff)
    if p == 0:
        return jnp.sum(diff != 0, axis=axis).astype(diff.dtype)
    if p == math.inf:
        return jnp.max(diff, axis=axis)
    if p == 1:
        return jnp.sum(diff, axis=axis)
    total = jnp.sum(jnp.square(diff) if p == 2 else diff**p, axis=axis)
    safe = jnp.where(total > 0, total, 1)
    return jnp.where(total > 0, jnp.sqrt(safe) if p == 2 else safe ** (1 / p), 0)


@aten("_cdist_forward.default")
def _cdist(x1, x2, p, compute_mode=None):
    # x1 (..., P, M), x2 (..., R, M) -> (..., P, R). Always the direct difference: PyTorch's
    # matmul shortcut for p=2 (compute_mode) differs from it by round-off only.
    return _p_norm(x1[..., :, None, :] - x2[..., None, :, :], p, -1)


@aten("_pdist_forward.default")
def _pdist(x, p=2.0):
    # x (N, M) -> the distances of the pairs i < j, row by row (N (N - 1) / 2,).
    rows, cols = np.triu_indices(x.shape[0], 1)
    return _p_norm(x[rows] - x[cols], p, -1)


def _fft_scale(n: int, normalization: int) -> float:
    # ATen's fft_norm_mode: 0 none, 1 by 1 / sqrt(n), 2 by 1 / n.
    return (1.0, 1.0 / math.sqrt(n), 1.0 / n)[normalization]


@aten("_fft_r2c.default")
def _fft_r2c(x, dim, normalization, onesided):
    axes = tuple(d % x.ndim for d in dim)
    n = math.prod(x.shape[d] for d in axes)
    out = jnp.fft.rfftn(x, axes=axes) if onesided else jnp.fft.fftn(x, axes=axes)
    return out * _fft_scale(n, normalization)


@aten("_fft_c2r.default")
def _fft_c2r(x, dim, normalization, last_dim_size):
    axes = tuple(d % x.ndim for d in dim)
    sizes = [x.shape[d] for d in axes[:-1]] + [last_dim_size]
    n = math.prod(sizes)
    # irfftn divides by n; ATen's c2r is unnormalised before ``normalization``.
    return jnp.fft.irfftn(x, s=sizes, axes=axes) * (n * _fft_scale(n, normalization))

"""The op table, part 4: layers. Convolution, pooling, resizing, normalisation, softmax,
embeddings, attention, dropout and random numbers.

Every layer keeps PyTorch's layouts (NCHW activations, OIHW kernels), so weights move between
the frameworks without transposes. Norms and softmax compute in float32 at least, as PyTorch's
CPU kernels do for half-precision inputs. Random ops take a jax.random key first: the
interpreter folds the node's position into the step's key, so every dropout site draws
different numbers (never PyTorch's: its generator cannot be reproduced).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mlperf_tutor.migrate.aten_ops import acc_dtype, aten, jax_dtype, wide

# --- convolution ----------------------------------------------------------------------------


def _tuple(value, n: int) -> tuple[int, ...]:
    value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return value * n if len(value) == 1 else value


@aten("convolution.default")
def _convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    n = weight.ndim - 2  # spatial dims
    stride, padding, dilation = (_tuple(v, n) for v in (stride, padding, dilation))
    letters = "DHW"[-n:] if n <= 3 else None
    numbers = ("NC" + letters, "OI" + letters, "NC" + letters)
    if not transposed:
        y = lax.conv_general_dilated(
            x,
            weight,
            stride,
            [(p, p) for p in padding],
            rhs_dilation=dilation,
            dimension_numbers=numbers,
            feature_group_count=groups,
            preferred_element_type=wide(x, weight),
        )
    else:
        # A transposed convolution is the gradient of a convolution: dilate the input by the
        # stride and convolve with the flipped kernel, (in, out/g) swapped per group.
        kernel = weight.shape[2:]
        c_in, c_out_g = weight.shape[:2]
        w = weight.reshape(groups, c_in // groups, c_out_g, *kernel).swapaxes(1, 2)
        w = jnp.flip(w.reshape(groups * c_out_g, c_in // groups, *kernel), tuple(range(2, 2 + n)))
        pads = [
            (d * (k - 1) - p, d * (k - 1) - p + o)
            for k, p, d, o in zip(kernel, padding, dilation, _tuple(output_padding, n), strict=True)
        ]
        y = lax.conv_general_dilated(
            x,
            w,
            (1,) * n,
            pads,
            lhs_dilation=stride,
            rhs_dilation=dilation,
            dimension_numbers=numbers,
            feature_group_count=groups,
            preferred_element_type=wide(x, weight),
        )
    return y if bias is None else y + bias.reshape(-1, *(1,) * n)


# --- pooling and resizing -------------------------------------------------------------------


def _pool_pads(size, kernel, stride, padding, dilation, ceil_mode):
    """(low, high) padding per spatial dim giving PyTorch's output size exactly."""
    pads = []
    for length, k, s, p, d in zip(size, kernel, stride, padding, dilation, strict=True):
        span = length + 2 * p - d * (k - 1) - 1
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= length + p:  # the last window must start inside
            out -= 1
        pads.append((p, (out - 1) * s + d * (k - 1) + 1 - length - p))
    return pads


def _pool_args(x, kernel_size, stride, padding, dilation=1):
    n = len(kernel_size)
    kernel = _tuple(kernel_size, n)
    stride = _tuple(stride, n) if stride else kernel  # [] means "the kernel size"
    return n, kernel, stride, _tuple(padding, n), _tuple(dilation, n)


def _window_reduce(x, init, op, n, kernel, stride, dilation, pads):
    lead = x.ndim - n
    # A numpy init value stays concrete under jit, so jax sees a max/sum window (which it can
    # differentiate) rather than a generic reduction.
    init = np.array(init, x.dtype)
    # lax.pad takes negative (cropping) widths, which floor mode needs at the end.
    x = lax.pad(x, init, [(0, 0, 0)] * lead + [(lo, hi, 0) for lo, hi in pads])
    return lax.reduce_window(
        x,
        init,
        op,
        (1,) * lead + kernel,
        (1,) * lead + stride,
        "VALID",
        window_dilation=(1,) * lead + dilation,
    )


def _indices_unused(node) -> str | None:
    if any(user.args[1] != 0 for user in node.users):
        return "its indices (return_indices=True, max_unpool) are not translated"
    return None


@aten(
    "max_pool2d_with_indices.default",
    "max_pool3d_with_indices.default",
    "max_pool1d_with_indices.default",
    check=_indices_unused,
)
def _max_pool(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    n, kernel, stride, padding, dilation = _pool_args(x, kernel_size, stride, padding, dilation)
    pads = _pool_pads(x.shape[-n:], kernel, stride, padding, dilation, ceil_mode)
    low = -jnp.inf if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.iinfo(x.dtype).min
    out = _window_reduce(x, low, lax.max, n, kernel, stride, dilation, pads)
    return out, jnp.zeros(out.shape, jnp.int32)  # the check above keeps the indices unused


@aten("max_pool2d.default", "max_pool1d.default", "max_pool3d.default")
def _max_pool_values(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    return _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode)[0]


@aten("avg_pool2d.default", "avg_pool3d.default", "avg_pool1d.default")
def _avg_pool(
    x,
    kernel_size,
    stride=(),
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    n, kernel, stride, padding, dilation = _pool_args(x, kernel_size, stride, padding)
    pads = _pool_pads(x.shape[-n:], kernel, stride, padding, dilation, ceil_mode)
    total = _window_reduce(x, 0, lax.add, n, kernel, stride, dilation, pads)
    if divisor_override:
        return total / divisor_override
    # Window sizes, computed once from the static shape: PyTorch counts the explicit padding
    # (count_include_pad) but never the extra end padding that ceil_mode adds.
    ones = np.ones(x.shape[-n:], np.float32)
    if count_include_pad:
        ones = np.pad(ones, [(p, p) for p in padding], constant_values=1)
        pads = [(0, hi - p) for (_, hi), p in zip(pads, padding, strict=True)]
    count = _window_reduce(jnp.asarray(ones), 0, lax.add, n, kernel, stride, dilation, pads)
    return total / count.astype(total.dtype)


def _adaptive_1d(x, axis: int, out: int, reduce):
    length = x.shape[axis]
    if length % out == 0:  # equal bins
        shape = x.shape[:axis] + (out, length // out) + x.shape[axis + 1 :]
        return reduce(x.reshape(shape), axis + 1)
    # PyTorch's bins: [floor(i L / out), ceil((i + 1) L / out)).
    bins = [(i * length // out, -(-(i + 1) * length // out)) for i in range(out)]
    parts = [reduce(lax.slice_in_dim(x, a, b, axis=axis), axis) for a, b in bins]
    return jnp.stack(parts, axis)


def _adaptive(x, output_size, reduce):
    # A mean (max) over a rectangle of bins is the mean (max) of per-axis means (maxima).
    n = len(output_size)
    for i, out in enumerate(output_size):
        x = _adaptive_1d(x, x.ndim - n + i, out, reduce)
    return x


@aten(
    "_adaptive_avg_pool2d.default",
    "_adaptive_avg_pool3d.default",
    "adaptive_avg_pool1d.default",
    "adaptive_avg_pool2d.default",
)
def _adaptive_avg_pool(x, output_size):
    return _adaptive(x, output_size, lambda v, axis: v.mean(axis))


@aten(
    "adaptive_max_pool2d.default",
    "adaptive_max_pool3d.default",
    "adaptive_max_pool1d.default",
    check=_indices_unused,
)
def _adaptive_max_pool(x, output_size):
    out = _adaptive(x, output_size, lambda v, axis: v.max(axis))
    return out, jnp.zeros(out.shape, jnp.int32)  # the check keeps the indices unused


def _resize_sources(x, output_size, scale_factors, scales=()):
    """(spatial dims, [(input size, output size, source step per output step)]). ``scales``:
    the per-dim scales of the ``.default`` overloads, which take precedence over the sizes."""
    if output_size and any(scales):
        sizes = x.shape[-len(output_size) :]
        scales = (*scales, *(None,) * (len(sizes) - len(scales)))  # trailing Nones left out
        steps = [
            1 / s if s else n / out for n, out, s in zip(sizes, output_size, scales, strict=True)
        ]
        return len(output_size), list(zip(sizes, output_size, steps, strict=True))
    if output_size:
        sizes = x.shape[-len(output_size) :]
        pairs = zip(sizes, output_size, strict=True)
        return len(output_size), [(length, out, length / out) for length, out in pairs]
    # With scale factors PyTorch maps positions by 1 / factor, not by the size ratio.
    sizes = x.shape[-len(scale_factors) :]
    pairs = zip(sizes, scale_factors, strict=True)
    return len(scale_factors), [(length, math.floor(length * f), 1 / f) for length, f in pairs]


@aten("upsample_nearest1d.default", "upsample_nearest2d.default", "upsample_nearest3d.default")
def _upsample_nearest_sizes(x, output_size, *scales):
    return _upsample_nearest(x, output_size, None, scales)


@aten("upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest3d.vec")
def _upsample_nearest(x, output_size, scale_factors, scales=()):
    n, axes = _resize_sources(x, output_size, scale_factors, scales)
    for i, (length, out, scale) in enumerate(axes):
        src = np.minimum(np.floor(np.arange(out) * np.float32(scale)), length - 1).astype(int)
        x = jnp.take(x, src, axis=x.ndim - n + i)
    return x


@aten("upsample_bilinear2d.default", "upsample_linear1d.default", "upsample_trilinear3d.default")
def _upsample_linear_sizes(x, output_size, align_corners, *scales):
    return _upsample_linear(x, output_size, align_corners, None, scales)


@aten("upsample_bilinear2d.vec", "upsample_linear1d.vec", "upsample_trilinear3d.vec")
def _upsample_linear(x, output_size, align_corners, scale_factors, scales=()):
    n, axes = _resize_sources(x, output_size, scale_factors, scales)
    for i, (length, out, scale) in enumerate(axes):
        dst = np.arange(out, dtype=np.float64)
        if align_corners:
            src = dst * ((length - 1) / (out - 1) if out > 1 else 0.0)
        else:
            src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), length - 1)
        hi = np.minimum(lo + 1, length - 1)
        w = (src - lo).astype(np.float32)
        axis = x.ndim - n + i
        shape = [1] * x.ndim
        shape[axis] = out
        w = jnp.asarray(w.reshape(shape), x.dtype)
        x = jnp.take(x, lo, axis=axis) * (1 - w) + jnp.take(x, hi, axis=axis) * w
    return x


# --- sampling and folding -------------------------------------------------------------------


def _reflect(coord, low2: int, high2: int):
    """Reflect ``coord`` into [low2 / 2, high2 / 2] (PyTorch's reflect_coordinates)."""
    if low2 == high2:
        return jnp.zeros_like(coord)
    low, span = low2 / 2, (high2 - low2) / 2
    coord = jnp.abs(coord - low)
    extra, flips = jnp.fmod(coord, span), jnp.floor(coord / span)
    return jnp.where(jnp.fmod(flips, 2) == 0, extra + low, span - extra + low)


def _source_coord(coord, size: int, padding_mode: int, align_corners: bool):
    """Grid values in [-1, 1] -> input pixel coordinates, after the padding mode's clipping."""
    if align_corners:
        coord = (coord + 1) / 2 * (size - 1)
    else:
        coord = ((coord + 1) * size - 1) / 2
    if padding_mode == 2:  # reflection
        low2, high2 = (0, 2 * (size - 1)) if align_corners else (-1, 2 * size - 1)
        coord = _reflect(coord, low2, high2)
    if padding_mode in (1, 2):  # border, and reflection's final clip
        coord = jnp.clip(coord, 0, size - 1)
    return coord


def _no_bicubic(node) -> str | None:
    if node.args[2] == 2:
        return "bicubic interpolation (mode='bicubic') is not translated"
    return None


@aten("grid_sampler_2d.default", check=_no_bicubic)
def _grid_sampler_2d(x, grid, interpolation_mode, padding_mode, align_corners):
    # x (N, C, H, W), grid (N, Ho, Wo, 2) of (x, y) in [-1, 1] -> (N, C, Ho, Wo)
    height, width = x.shape[-2:]
    gx = _source_coord(grid[..., 0], width, padding_mode, align_corners)
    gy = _source_coord(grid[..., 1], height, padding_mode, align_corners)

    def tap(iy, ix):
        # x at integer (iy, ix) per output pixel; zero outside the image.
        inside = (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
        iy_c, ix_c = jnp.clip(iy, 0, height - 1), jnp.clip(ix, 0, width - 1)
        values = jax.vmap(lambda img, y, x_: img[:, y, x_])(x, iy_c, ix_c)  # (N, C, Ho, Wo)
        return jnp.where(inside[:, None], values, 0)

    if interpolation_mode == 1:  # nearest, halves to even as PyTorch's nearbyint
        return tap(jnp.round(gy).astype(jnp.int32), jnp.round(gx).astype(jnp.int32))
    x0, y0 = jnp.floor(gx), jnp.floor(gy)
    wx, wy = (gx - x0)[:, None], (gy - y0)[:, None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    top = tap(y0, x0) * (1 - wx) + tap(y0, x0 + 1) * wx
    bottom = tap(y0 + 1, x0) * (1 - wx) + tap(y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bottom * wy


@aten("col2im.default")
def _col2im(x, output_size, kernel_size, dilation, padding, stride):
    # x (N, C kh kw, L) -> (N, C, H, W): every column's patch added back at its place.
    batched = x.ndim == 3
    x = x if batched else x[None]
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = (
        _tuple(v, 2) for v in (kernel_size, dilation, padding, stride)
    )
    height, width = output_size
    blocks_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    blocks_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    ki, kj, bi, bj = np.meshgrid(
        np.arange(kh), np.arange(kw), np.arange(blocks_h), np.arange(blocks_w), indexing="ij"
    )
    rows = (bi * sh + ki * dh).reshape(kh * kw, -1)  # in the padded output
    cols = (bj * sw + kj * dw).reshape(kh * kw, -1)
    n, c = x.shape[0], x.shape[1] // (kh * kw)
    patches = x.reshape(n, c, kh * kw, blocks_h * blocks_w)
    out = jnp.zeros((n, c, height + 2 * ph, width + 2 * pw), x.dtype)
    out = out.at[:, :, rows, cols].add(patches)[:, :, ph : ph + height, pw : pw + width]
    return out if batched else out[0]


# --- normalisation --------------------------------------------------------------------------


def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


@aten("native_layer_norm.default")
def _layer_norm(x, normalized_shape, weight, bias, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    h = x.astype(acc_dtype(x))
    mean = h.mean(axes, keepdims=True)
    rstd = lax.rsqrt(jnp.square(h - mean).mean(axes, keepdims=True) + eps)
    y = _affine((h - mean) * rstd, weight, bias, tuple(normalized_shape))
    return y.astype(x.dtype), mean, rstd


@aten("native_group_norm.default")
def _group_norm(x, weight, bias, n, c, hxw, group, eps):
    h = x.astype(acc_dtype(x)).reshape(n, group, -1)
    mean = h.mean(-1, keepdims=True)
    rstd = lax.rsqrt(jnp.square(h - mean).mean(-1, keepdims=True) + eps)
    y = ((h - mean) * rstd).reshape(x.shape)
    y = _affine(y, weight, bias, (1, c) + (1,) * (x.ndim - 2))
    return y.astype(x.dtype), mean[..., 0], rstd[..., 0]


def _batch_stats(x):
    """Per-channel mean and biased variance over every dim but 1 (N, C, ...)."""
    axes = (0,) + tuple(range(2, x.ndim))
    h = x.astype(acc_dtype(x))
    mean = h.mean(axes)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    var = jnp.square(h - mean.reshape(shape)).mean(axes)
    return h, mean, var, shape


def _normalize(h, mean, var, weight, bias, eps, shape, dtype):
    invstd = lax.rsqrt(var + eps)
    y = (h - mean.reshape(shape)) * invstd.reshape(shape)
    return _affine(y, weight, bias, shape).astype(dtype), invstd


@aten("_native_batch_norm_legit_functional.default")
def _batch_norm_train(x, weight, bias, running_mean, running_var, training, momentum, eps):
    if not training:
        out, _, _ = _batch_norm_eval(x, weight, bias, running_mean, running_var, momentum, eps)
        return out, running_mean[:0], running_var[:0], running_mean, running_var
    h, mean, var, shape = _batch_stats(x)
    y, invstd = _normalize(h, mean, var, weight, bias, eps, shape, x.dtype)
    # The running variance is PyTorch's unbiased estimate: n / (n - 1) times the batch's.
    n = x.size // x.shape[1]
    unbiased = var * (n / max(n - 1, 1))
    new_mean = momentum * mean + (1 - momentum) * running_mean
    new_var = momentum * unbiased + (1 - momentum) * running_var
    return y, mean, invstd, new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)


@aten("_native_batch_norm_legit_no_training.default")
def _batch_norm_eval(x, weight, bias, running_mean, running_var, momentum, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    h = x.astype(acc_dtype(x))
    y, _ = _normalize(h, running_mean, running_var, weight, bias, eps, shape, x.dtype)
    return y, jnp.zeros((0,), h.dtype), jnp.zeros((0,), h.dtype)


def _stats_not_updated(node) -> str | None:
    training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training")
    if training:
        return (
            "training=True updates running_mean/running_var in place; export the model with "
            "torch.export (its functional form, _native_batch_norm_legit_functional, is "
            "translated)"
        )
    return None


@aten("_native_batch_norm_legit.default", check=_stats_not_updated)
def _batch_norm_legit(x, weight, bias, running_mean, running_var, training, momentum, eps):
    return _batch_norm_eval(x, weight, bias, running_mean, running_var, momentum, eps)


@aten("_native_batch_norm_legit.no_stats")
def _batch_norm_no_stats(x, weight, bias, training, momentum, eps):
    h, mean, var, shape = _batch_stats(x)
    y, invstd = _normalize(h, mean, var, weight, bias, eps, shape, x.dtype)
    return y, mean, invstd


# --- softmax --------------------------------------------------------------------------------


@aten("_softmax.default", "softmax.int")
def _softmax(x, dim, half_to_float=False, dtype=None):
    return jax.nn.softmax(x.astype(jax_dtype(dtype) or acc_dtype(x)), axis=dim)


@aten("_log_softmax.default", "log_softmax.int")
def _log_softmax(x, dim, half_to_float=False, dtype=None):
    return jax.nn.log_softmax(x.astype(jax_dtype(dtype) or acc_dtype(x)), axis=dim)


def _safe_softmax_of(scores, axis):
    """Softmax that gives 0 (and a zero gradient, not NaN) on rows masked entirely to -inf."""
    empty = jnp.all(scores == -jnp.inf, axis=axis, keepdims=True)
    probs = jax.nn.softmax(jnp.where(empty, 0, scores), axis=axis)
    return jnp.where(empty, 0, probs)


@aten("_safe_softmax.default")
def _safe_softmax(x, dim, dtype=None):
    return _safe_softmax_of(x.astype(jax_dtype(dtype) or acc_dtype(x)), dim)


# --- embeddings -----------------------------------------------------------------------------


def _no_freq_scaling(node) -> str | None:
    if any(a is True for a in (*node.args[3:4], node.kwargs.get("scale_grad_by_freq"))):
        return "scale_grad_by_freq=True is not translated"
    return None


@aten("embedding.default", check=_no_freq_scaling)
def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    out = jnp.take(weight, indices, axis=0)
    if padding_idx >= 0:  # PyTorch gives the padding row no gradient
        out = jnp.where((indices == padding_idx)[..., None], lax.stop_gradient(out), out)
    return out


@aten("_embedding_bag.default", "_embedding_bag_forward_only.default", check=_no_freq_scaling)
def _embedding_bag(
    weight,
    indices,
    offsets,
    scale_grad_by_freq=False,
    mode=0,
    sparse=False,
    per_sample_weights=None,
    include_last_offset=False,
    padding_idx=-1,
):
    n, bags = indices.shape[0], offsets.shape[0] - (1 if include_last_offset else 0)
    valid = indices != padding_idx if padding_idx >= 0 else jnp.ones(indices.shape, bool)
    rows = jnp.take(weight, indices, axis=0)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights[:, None]
    if isinstance(offsets, jax.core.Tracer):  # offsets known only at run time
        bag_of = jnp.searchsorted(offsets, jnp.arange(n), side="right") - 1
    else:  # offsets are constants (nn.EmbeddingBag on a 2-D input): the bags are static
        starts = np.asarray(offsets)[:bags]
        size = n // bags if bags else 0
        if bags and size * bags == n and np.array_equal(starts, np.arange(0, n, size)):
            grouped = rows.reshape(bags, size, -1), valid.reshape(bags, size)
            return _equal_bags(*grouped, indices.reshape(bags, size), mode)
        bag_of = jnp.asarray(np.searchsorted(starts, np.arange(n), side="right") - 1)
    count = jax.ops.segment_sum(valid.astype(jnp.int32), bag_of, num_segments=bags)
    winner = None
    if mode == 2:  # max; an empty bag gives zeros
        low = jnp.where(valid[:, None], rows, -jnp.inf)
        out = jax.ops.segment_max(low, bag_of, num_segments=bags)
        # The row each maximum came from (the first on ties), for the fourth output.
        hit = valid[:, None] & (low == out[bag_of])
        where = jnp.where(hit, jnp.arange(n)[:, None], n)
        first = jax.ops.segment_min(where, bag_of, num_segments=bags)
        winner = jnp.where(first < n, indices[jnp.minimum(first, n - 1)], 0)
        out = jnp.where(count[:, None] > 0, out, 0)
    else:
        out = jax.ops.segment_sum(jnp.where(valid[:, None], rows, 0), bag_of, num_segments=bags)
        if mode == 1:  # mean
            out = out / jnp.maximum(count, 1)[:, None].astype(out.dtype)
    return _bag_outputs(out.astype(weight.dtype), bag_of, count, mode, winner)


def _bag_outputs(out, bag_of, count, mode, winner):
    """PyTorch's four outputs (the last three are what its backward reads): the bags;
    offset2bag, bag sizes and max_indices, which in sum mode are empty, zeros and zeros, in mean
    mode the bag of each index, the sizes and the sizes again, and in max mode the bag of each
    index, the sizes and the weight row of each maximum."""
    if mode == 0:
        zeros = jnp.zeros(count.shape, count.dtype)
        return out, bag_of[:0], zeros, zeros
    return out, bag_of, count, count if mode == 1 else winner


def _equal_bags(rows, valid, indices, mode):
    # rows (bags, L, D), valid and indices (bags, L): a plain sum / mean / max over L.
    count = valid.sum(1)
    winner = None
    if mode == 2:
        low = jnp.where(valid[..., None], rows, -jnp.inf)
        first = jnp.argmax(low, axis=1)  # (bags, D), the first on ties
        winner = jnp.where(count[:, None] > 0, jnp.take_along_axis(indices, first, axis=1), 0)
        out = jnp.where(count[:, None] > 0, low.max(1), 0)
    else:
        out = jnp.where(valid[..., None], rows, 0).sum(1)
        if mode == 1:
            out = out / jnp.maximum(count, 1)[:, None].astype(out.dtype)
    bags, size = valid.shape
    bag_of = jnp.repeat(jnp.arange(bags), size)
    return _bag_outputs(out.astype(rows.dtype), bag_of, count, mode, winner)


# --- attention ------------------------------------------------------------------------------


def require_key(key):
    if key is None:
        raise ValueError(
            "this graph draws random numbers (dropout); pass a jax.random key to apply(..., key=)"
        )
    return key


def _dropout_of(key, x, p):
    keep = jax.random.bernoulli(require_key(key), 1.0 - p, x.shape)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - p), x.dtype), 0), keep


@aten("scaled_dot_product_attention.default", random=True)
def _sdpa(
    key, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False
):
    # q (..., N, T, E), k (..., K, S, E), v (..., K, S, Ev)
    if enable_gqa and q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]  # query head n reads kv head n // group
        k, v = jnp.repeat(k, group, axis=-3), jnp.repeat(v, group, axis=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = acc_dtype(q)
    scores = jnp.einsum("...te,...se->...ts", q, k, preferred_element_type=acc)  # (..., T, S)
    scores = scores * scale
    if is_causal:
        t, s = scores.shape[-2:]
        scores = jnp.where(jnp.tril(jnp.ones((t, s), bool)), scores, -jnp.inf)
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            scores = jnp.where(attn_mask, scores, -jnp.inf)
        else:
            scores = scores + attn_mask.astype(acc)
    probs = _safe_softmax_of(scores, -1)
    if dropout_p > 0:
        probs = _dropout_of(key, probs, dropout_p)[0]
    probs = probs.astype(v.dtype)
    return jnp.einsum("...ts,...se->...te", probs, v, preferred_element_type=wide(v))


# --- backward ops ---------------------------------------------------------------------------
# A graph differentiated by PyTorch (torch.func.grad inside the loss, a gradient penalty) holds
# these; jax's own derivative of the forward translation computes the same numbers.


def _masked(values, output_mask):
    return tuple(v if keep else None for v, keep in zip(values, output_mask, strict=True))


@aten("convolution_backward.default")
def _convolution_backward(
    grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask
):
    def forward(x, weight):
        args = (stride, padding, dilation, transposed, output_padding, groups)
        return _convolution(x, weight, None, *args)

    _, pullback = jax.vjp(forward, x, weight)
    grad_x, grad_w = pullback(grad.astype(jnp.result_type(x, weight)))
    grad_b = grad.sum((0, *range(2, grad.ndim))) if bias_sizes is not None else None
    return _masked((grad_x, grad_w, grad_b), mask)


@aten("avg_pool2d_backward.default", "avg_pool3d_backward.default")
def _avg_pool_backward(grad, x, *args):
    return jax.vjp(lambda v: _avg_pool(v, *args), x)[1](grad)[0]


@aten("_adaptive_avg_pool2d_backward.default", "_adaptive_avg_pool3d_backward.default")
def _adaptive_avg_pool_backward(grad, x):
    n = grad.ndim - 2
    return jax.vjp(lambda v: _adaptive_avg_pool(v, grad.shape[-n:]), x)[1](grad)[0]


@aten("max_pool2d_with_indices_backward.default", "max_pool3d_with_indices_backward.default")
def _max_pool_backward(grad, x, kernel_size, stride, padding, dilation, ceil_mode, indices):
    # ``indices`` are flat positions in each (N, C) plane of x: the gradient goes back there.
    n = len(kernel_size)
    lead = x.shape[:-n]
    flat_grad = grad.reshape(*lead, -1)
    flat_index = indices.reshape(*lead, -1)
    planes = jnp.zeros((*lead, math.prod(x.shape[-n:])), grad.dtype)
    where = tuple(jnp.indices(flat_index.shape, sparse=True)[:-1]) + (flat_index,)
    return planes.at[where].add(flat_grad).reshape(x.shape)


@aten("embedding_dense_backward.default")
def _embedding_backward(grad, indices, num_weights, padding_idx, scale_grad_by_freq):
    flat = indices.reshape(-1)
    rows = grad.reshape(flat.shape[0], -1)
    if padding_idx >= 0:
        rows = jnp.where((flat == padding_idx)[:, None], 0, rows)
    if scale_grad_by_freq:
        counts = jnp.zeros((num_weights,), rows.dtype).at[flat].add(1)
        rows = rows / counts[flat][:, None]
    return jnp.zeros((num_weights, rows.shape[1]), rows.dtype).at[flat].add(rows)


def _norm_input_grad(g, xhat, rstd, axes):
    """d loss / d x of (x - mean) * rstd with the mean and rstd of x over ``axes``."""
    count = math.prod(g.shape[a] for a in axes)
    mean_g = g.sum(axes, keepdims=True) / count
    mean_gx = (g * xhat).sum(axes, keepdims=True) / count
    return (g - mean_g - xhat * mean_gx) * rstd


@aten("native_layer_norm_backward.default")
def _layer_norm_backward(grad, x, normalized_shape, mean, rstd, weight, bias, mask):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    batch_axes = tuple(range(x.ndim - len(normalized_shape)))
    h, g = x.astype(acc_dtype(x)), grad.astype(acc_dtype(x))
    xhat = (h - mean) * rstd
    scaled = g if weight is None else g * weight
    grad_x = _norm_input_grad(scaled, xhat, rstd, axes).astype(x.dtype)
    grad_w = (g * xhat).sum(batch_axes) if weight is not None else None
    grad_b = g.sum(batch_axes) if bias is not None else None
    return _masked((grad_x, grad_w, grad_b), mask)


@aten("native_group_norm_backward.default")
def _group_norm_backward(grad, x, mean, rstd, weight, n, c, hxw, group, mask):
    h = x.astype(acc_dtype(x)).reshape(n, group, c // group, -1)
    g = grad.astype(h.dtype).reshape(n, c, -1)
    xhat = (h - mean[..., None, None]) * rstd[..., None, None]
    scaled = g if weight is None else g * weight[:, None]
    scaled = scaled.reshape(h.shape)
    grad_x = _norm_input_grad(scaled, xhat, rstd[..., None, None], (2, 3)).reshape(x.shape)
    per_channel = (g * xhat.reshape(n, c, -1)).sum((0, 2))
    return _masked((grad_x.astype(x.dtype), per_channel, g.sum((0, 2))), mask)


# --- dropout and random numbers -------------------------------------------------------------


@aten("native_dropout.default", random=True)
def _native_dropout(key, x, p, train=True):
    if train is False or p == 0:
        return x, jnp.ones(x.shape, bool)
    if p >= 1:
        return jnp.zeros_like(x), jnp.zeros(x.shape, bool)
    return _dropout_of(key, x, p)


@aten("dropout.default", random=True)
def _dropout(key, x, p, train):
    return _native_dropout(key, x, p, train)[0]


def _float_dtype(dtype, like=None):
    return jax_dtype(dtype) or (like.dtype if like is not None else np.dtype(np.float32))


@aten("rand.default", random=True)
def _rand(key, size, *, dtype=None, **_):
    return jax.random.uniform(require_key(key), tuple(size), _float_dtype(dtype))


@aten("randn.default", random=True)
def _randn(key, size, *, dtype=None, **_):
    return jax.random.normal(require_key(key), tuple(size), _float_dtype(dtype))


@aten("rand_like.default", random=True)
def _rand_like(key, x, *, dtype=None, **_):
    return jax.random.uniform(require_key(key), x.shape, _float_dtype(dtype, x))


@aten("randn_like.default", random=True)
def _randn_like(key, x, *, dtype=None, **_):
    return jax.random.normal(require_key(key), x.shape, _float_dtype(dtype, x))


@aten("bernoulli.p", random=True)
def _bernoulli_p(key, x, p=0.5, *, generator=None):
    return jax.random.bernoulli(require_key(key), p, x.shape).astype(x.dtype)


@aten("bernoulli.default", random=True)
def _bernoulli(key, x, *, generator=None):
    return jax.random.bernoulli(require_key(key), x, x.shape).astype(x.dtype)


@aten("randint.low", "randint.default", random=True)
def _randint(key, *args, dtype=None, **_):
    low, high, size = (0, *args) if len(args) == 2 else args
    out = jax_dtype(dtype) or jax_dtype(np.int64)
    return jax.random.randint(require_key(key), tuple(size), low, high, out)


@aten("randperm.default", random=True)
def _randperm(key, n, *, dtype=None, **_):
    perm = jax.random.permutation(require_key(key), n)
    return perm.astype(jax_dtype(dtype) or jax_dtype(np.int64))

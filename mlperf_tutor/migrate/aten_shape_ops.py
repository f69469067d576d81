"""The op table, part 3: views, shapes, concatenation, indexing, gather and scatter.

PyTorch views share storage; jax arrays are values. The exported graph is functional (in-place
updates are already rewritten as ``*_scatter`` ops and copies), so every view here is simply the
value it shows. Conventions as in :mod:`.aten_ops`.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
from jax import lax

from mlperf_tutor.migrate.aten_ops import aten

# --- views and shapes -----------------------------------------------------------------------


@aten("view.default", "reshape.default", "_unsafe_view.default", "view_copy.default")
def _view(x, size):
    return jnp.reshape(x, tuple(size))


@aten("permute.default", "permute_copy.default")
def _permute(x, dims):
    return jnp.transpose(x, tuple(dims))


@aten("transpose.int", "transpose_copy.int")
def _transpose(x, dim0, dim1):
    return jnp.swapaxes(x, dim0, dim1)


@aten("t.default")
def _t(x):
    return x.T


@aten("expand.default", "expand_copy.default")
def _expand(x, size, *, implicit=False):
    lead = len(size) - x.ndim
    # -1 keeps the existing size; new leading dims cannot be -1.
    shape = [s if s != -1 else x.shape[i - lead] for i, s in enumerate(size)]
    return jnp.broadcast_to(x, tuple(shape))


@aten("unsqueeze.default", "unsqueeze_copy.default")
def _unsqueeze(x, dim):
    return jnp.expand_dims(x, dim % (x.ndim + 1))


@aten("squeeze.dims", "squeeze.dim", "squeeze.default", "squeeze_copy.dims")
def _squeeze(x, dim=None):
    dims = range(x.ndim) if dim is None else [dim] if isinstance(dim, int) else dim
    # PyTorch leaves a named dim of size != 1 in place instead of failing.
    drop = tuple(d % x.ndim for d in dims if x.ndim and x.shape[d] == 1)
    return jnp.squeeze(x, drop) if drop else x


@aten("flatten.using_ints")
def _flatten(x, start_dim=0, end_dim=-1):
    if x.ndim == 0:
        return x.reshape(1)
    start, end = start_dim % x.ndim, end_dim % x.ndim
    return x.reshape(*x.shape[:start], -1, *x.shape[end + 1 :])


def _along(dim: int, ndim: int, index) -> tuple:
    """An index tuple that applies ``index`` to axis ``dim`` only."""
    return (slice(None),) * (dim % ndim) + (index,)


@aten("slice.Tensor", "slice_copy.Tensor")
def _slice(x, dim=0, start=None, end=None, step=1):
    return x[_along(dim, x.ndim, slice(start, end, step))]


@aten("select.int", "select_copy.int")
def _select(x, dim, index):
    return x[_along(dim, x.ndim, index)]


@aten("narrow.default")
def _narrow(x, dim, start, length):
    start = start % x.shape[dim]
    return x[_along(dim, x.ndim, slice(start, start + length))]


@aten("diagonal.default", "diagonal_copy.default")
def _diagonal(x, offset=0, dim1=0, dim2=1):
    return jnp.diagonal(x, offset, dim1, dim2)


@aten("cat.default", "concat.default")
def _cat(tensors, dim=0):
    # PyTorch still accepts (and skips) 1-D empty tensors next to tensors of any rank.
    ndim = max(jnp.ndim(t) for t in tensors)
    kept = [t for t in tensors if not (jnp.ndim(t) == 1 and t.shape[0] == 0 and ndim > 1)]
    return jnp.concatenate(kept, axis=dim % ndim)


@aten("stack.default")
def _stack(tensors, dim=0):
    return jnp.stack(tensors, axis=dim)


@aten("split_with_sizes.default", "split_with_sizes_copy.default")
def _split_with_sizes(x, split_sizes, dim=0):
    cuts = list(itertools.accumulate(split_sizes))[:-1]
    return tuple(jnp.split(x, cuts, axis=dim))


@aten("split.Tensor", "split_copy.Tensor")
def _split(x, split_size, dim=0):
    n = x.shape[dim]
    return tuple(_slice(x, dim, i, i + split_size) for i in range(0, n, split_size)) or (x,)


@aten("chunk.default")
def _chunk(x, chunks, dim=0):
    return _split(x, -(-x.shape[dim] // chunks), dim)


@aten("unbind.int", "unbind_copy.int")
def _unbind(x, dim=0):
    return tuple(_select(x, dim, i) for i in range(x.shape[dim]))


@aten("flip.default")
def _flip(x, dims):
    return jnp.flip(x, tuple(dims))


@aten("roll.default")
def _roll(x, shifts, dims=()):
    if not dims:
        return jnp.roll(x.reshape(-1), tuple(shifts)).reshape(x.shape)
    return jnp.roll(x, tuple(shifts), tuple(dims))


@aten("unfold.default")
def _unfold(x, dimension, size, step):
    # Windows of ``size`` every ``step`` along ``dimension``, the window as a new last dim.
    if x.ndim == 0:
        return x.reshape(1)
    count = (x.shape[dimension] - size) // step + 1
    where = jnp.arange(count)[:, None] * step + jnp.arange(size)  # (count, size)
    windows = jnp.take(x, where, axis=dimension)  # dimension -> (count, size)
    return jnp.moveaxis(windows, dimension % x.ndim + 1, -1)


@aten("repeat.default")
def _repeat(x, repeats):
    return jnp.tile(x, tuple(repeats))


@aten("repeat_interleave.self_int")
def _repeat_interleave(x, repeats, dim=None, *, output_size=None):
    if dim is None:
        return jnp.repeat(x.reshape(-1), repeats)
    return jnp.repeat(x, repeats, axis=dim)


@aten("constant_pad_nd.default")
def _constant_pad_nd(x, pad, value=0):
    # ``pad`` lists (before, after) from the last dim backwards; negative entries crop, which
    # lax.pad does as well.
    widths = [(0, 0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1], 0)
    return lax.pad(x, jnp.asarray(value, x.dtype), widths)


def _padded(x, pad, reflect: bool):
    """Reflection or replication padding. ``pad`` lists (before, after) from the last dim
    backwards, as for constant_pad_nd; negative widths crop. Output position i of a dim reads
    input position i - before, reflected about the ends or clamped to them."""
    for i in range(len(pad) // 2):
        axis, before, after = x.ndim - 1 - i, pad[2 * i], pad[2 * i + 1]
        n = x.shape[axis]
        src = np.arange(n + before + after) - before
        if reflect:
            src = np.abs(src)  # mirrored without repeating the edge
            src = np.where(src > n - 1, 2 * (n - 1) - src, src)
        x = jnp.take(x, np.clip(src, 0, n - 1), axis=axis)
    return x


@aten("reflection_pad1d.default", "reflection_pad2d.default", "reflection_pad3d.default")
def _reflection_pad(x, padding):
    return _padded(x, padding, reflect=True)


@aten("replication_pad1d.default", "replication_pad2d.default", "replication_pad3d.default")
def _replication_pad(x, padding):
    return _padded(x, padding, reflect=False)


def _strided_input(node) -> str | None:
    # A jax array is its values in row-major order; as_strided reads the torch tensor's
    # storage, which is the same only for a contiguous tensor that starts its storage.
    meta = node.args[0].meta.get("val") if hasattr(node.args[0], "meta") else None
    if meta is None or not meta.is_contiguous() or meta.storage_offset() != 0:
        return "its input is a view into a larger storage (not contiguous or offset)"
    return None


@aten("as_strided.default", "as_strided_copy.default", check=_strided_input)
def _as_strided(x, size, stride, storage_offset=None):
    coords = np.indices(tuple(size), dtype=np.int64)
    flat = (storage_offset or 0) + sum(c * s for c, s in zip(coords, stride, strict=True))
    flat = np.asarray(flat, np.int64).reshape(tuple(size))
    if flat.size and flat.max() >= x.size:
        raise ValueError(f"as_strided reads element {flat.max()} of a tensor of {x.size}")
    return jnp.reshape(x, -1)[flat]


# --- indexing, gather and scatter -----------------------------------------------------------


def _grid(index, dim: int) -> tuple:
    """Full coordinates for scatter/gather: ``index`` along ``dim``, positions elsewhere."""
    coords = list(jnp.indices(index.shape, sparse=True))
    coords[dim % index.ndim] = index
    return tuple(coords)


@aten("gather.default")
def _gather(x, dim, index, *, sparse_grad=False):
    if index.ndim == 0:
        return x[_along(dim, x.ndim, index)] if x.ndim else x
    return x[_grid(index, dim)]


@aten("index_select.default")
def _index_select(x, dim, index):
    if x.ndim == 0:  # the only index a 0-d tensor has is 0; the result stays 0-d
        return x
    return jnp.take(x, index.reshape(-1), axis=dim)


@aten("index.Tensor")
def _index(x, indices):
    # A None leaves its dim whole; jax applies numpy's advanced-indexing rules, as PyTorch does
    # (advanced indices separated by a slice move their result dims to the front).
    return x[tuple(slice(None) if i is None else i for i in indices)]


@aten("index_put.default")
def _index_put(x, indices, values, accumulate=False):
    at = x.at[tuple(slice(None) if i is None else i for i in indices)]
    return at.add(values) if accumulate else at.set(values)


@aten("index_add.default")
def _index_add(x, dim, index, source, *, alpha=1):
    at = x.at[_along(dim, x.ndim, index)]
    return at.add(source if alpha == 1 else alpha * source)


@aten("index_fill.int_Scalar", "index_fill.int_Tensor")
def _index_fill(x, dim, index, value):
    if x.ndim == 0:  # index is [0] or empty
        return jnp.asarray(value, x.dtype) if index.size else x
    return x.at[_along(dim, x.ndim, index)].set(value)


def _scatter_source(src, index):
    # src may be larger than index: only its leading index.shape block is used.
    if jnp.ndim(src) == 0:
        return src
    return src[tuple(slice(0, n) for n in index.shape)]


@aten("scatter.src", "scatter.value")
def _scatter(x, dim, index, src):
    return x.at[_grid(index, dim)].set(_scatter_source(src, index))


@aten("scatter_add.default")
def _scatter_add(x, dim, index, src):
    return x.at[_grid(index, dim)].add(_scatter_source(src, index))


@aten("scatter.reduce", "scatter.value_reduce")
def _scatter_reduce_legacy(x, dim, index, src, *, reduce):
    return _scatter_reduce(x, dim, index, src, {"add": "sum", "multiply": "prod"}[reduce])


@aten("scatter_reduce.two")
def _scatter_reduce(x, dim, index, src, reduce, *, include_self=True):
    where, src = _grid(index, dim), _scatter_source(src, index)
    if reduce == "mean":
        count = jnp.zeros(x.shape, x.dtype).at[where].add(1)
        base = x if include_self else x.at[where].set(0)
        total = base.at[where].add(src)
        count = count + 1 if include_self else count
        quotient = total / jnp.maximum(count, 1)
        out = quotient if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.floor_divide(total, count)
        return jnp.where(count > 0, out, x)
    identity = {"sum": 0, "prod": 1, "amax": -jnp.inf, "amin": jnp.inf}[reduce]
    if jnp.issubdtype(x.dtype, jnp.integer) and reduce in ("amax", "amin"):
        info = jnp.iinfo(x.dtype)
        identity = info.min if reduce == "amax" else info.max
    base = x if include_self else x.at[where].set(identity)
    method = {"sum": "add", "prod": "multiply", "amax": "max", "amin": "min"}[reduce]
    return getattr(base.at[where], method)(src)


@aten("masked_fill.Scalar", "masked_fill.Tensor")
def _masked_fill(x, mask, value):
    return jnp.where(mask, jnp.asarray(value, x.dtype), x)


@aten("masked_scatter.default")
def _masked_scatter(x, mask, source):
    # The k-th True position (row-major) takes the k-th element of source.
    mask = jnp.broadcast_to(mask, x.shape)
    position = jnp.cumsum(mask.reshape(-1)) - 1
    taken = jnp.reshape(source, -1)[jnp.clip(position, 0, max(source.size - 1, 0))]
    return jnp.where(mask, taken.reshape(x.shape).astype(x.dtype), x)


@aten("slice_scatter.default")
def _slice_scatter(x, src, dim=0, start=None, end=None, step=1):
    return x.at[_along(dim, x.ndim, slice(start, end, step))].set(src)


@aten("select_scatter.default")
def _select_scatter(x, src, dim, index):
    return x.at[_along(dim, x.ndim, index)].set(src)


@aten("diagonal_scatter.default")
def _diagonal_scatter(x, src, offset=0, dim1=0, dim2=1):
    n = jnp.diagonal(x, offset, dim1, dim2).shape[-1]
    rows = jnp.arange(n) + max(-offset, 0)
    cols = jnp.arange(n) + max(offset, 0)
    moved = jnp.moveaxis(x, (dim1, dim2), (-2, -1))
    moved = moved.at[..., rows, cols].set(src)
    return jnp.moveaxis(moved, (-2, -1), (dim1, dim2))

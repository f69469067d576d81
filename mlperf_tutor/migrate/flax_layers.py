"""Flax NNX translations of standard PyTorch layers, for :mod:`mlperf_tutor.migrate.flax_source`.

Each layer with state becomes an NNX constructor (with every hyperparameter whose default
differs between the frameworks passed explicitly) plus a table that maps its torch weights to
NNX names and layouts; each parameter-free layer becomes inline code (``{x}`` is its input).
4-D activations are NHWC images on the Flax side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn


class UnsupportedModuleError(ValueError):
    """A module, or an operation in a module's forward, that has no Flax NNX translation here."""


@dataclasses.dataclass
class Code:
    """Source text used as is (a function reference, ``rngs``)."""

    text: str


@dataclasses.dataclass
class Ctor:
    """A constructor call; ``args`` are (keyword or None, hyperparameter name, value, comment)."""

    fn: str
    args: list[tuple[str | None, str, Any, str]]
    multiline: bool = False  # one argument per line (containers)


def pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def shape_text(shape, batch: int | None) -> str:
    dims = list(shape)
    if len(dims) == 4:
        dims = [dims[0], dims[2], dims[3], dims[1]]  # NCHW -> NHWC
    if dims and batch is not None and dims[0] == batch:
        dims[0] = "B"
    return "(" + ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "") + ")"


def gelu_code(approximate: str) -> str:
    flag = {"none": "False", "tanh": "True"}[approximate]  # torch's default is the exact erf
    return f"nnx.gelu({{x}}, approximate={flag})"


def flatten_code(start: int, end: int, rank: int | None) -> str:
    if rank is None:
        raise UnsupportedModuleError("flatten of a value of unknown rank (not run on the example)")
    start, end = start % rank, end % rank
    front = [f"{{x}}.shape[{i}]" for i in range(start)]
    back = [f"{{x}}.shape[{i}]" for i in range(end + 1, rank)]
    if rank == 4:  # an NHWC image: back to NCHW first, torch's order of the flattened features
        if back or start > 1:
            raise UnsupportedModuleError("flatten of a 4-D value other than flatten(x, 0 or 1)")
        return "jnp.transpose({x}, (0, 3, 1, 2)).reshape(" + ", ".join([*front, "-1"]) + ")"
    return "{x}.reshape(" + ", ".join([*front, "-1", *back]) + ")"


STATEFUL = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
STATEFUL += (nn.Embedding, nn.Dropout)
STATELESS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity, nn.Flatten)
STATELESS += (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def stateless_code(mod: nn.Module, rank: int | None) -> str:
    """Inline code (``{x}`` is the input) of a parameter-free layer (a STATELESS type)."""
    kind = type(mod)
    if kind is nn.ReLU:
        return "nnx.relu({x})"
    if kind is nn.GELU:
        return gelu_code(mod.approximate)
    if kind in (nn.SiLU, nn.Tanh, nn.Sigmoid):
        return f"nnx.{kind.__name__.lower()}({{x}})"
    if kind is nn.LeakyReLU:
        return f"nnx.leaky_relu({{x}}, negative_slope={mod.negative_slope!r})"
    if kind is nn.Identity:
        return "{x}"
    if kind is nn.Flatten:
        return flatten_code(mod.start_dim, mod.end_dim, rank)
    if kind in (nn.MaxPool2d, nn.AvgPool2d):
        if getattr(mod, "ceil_mode", False) or pair(getattr(mod, "dilation", 1)) != (1, 1):
            raise UnsupportedModuleError(f"{kind.__name__} with ceil_mode or dilation")
        if getattr(mod, "return_indices", False) or getattr(mod, "divisor_override", None):
            raise UnsupportedModuleError(f"{kind.__name__} with return_indices/divisor_override")
        window, pad = pair(mod.kernel_size), pair(mod.padding)
        strides = pair(mod.stride or mod.kernel_size)
        padding = '"VALID"' if pad == (0, 0) else repr(tuple((p, p) for p in pad))
        fn = "max_pool" if kind is nn.MaxPool2d else "avg_pool"
        extra = "" if fn == "max_pool" else f", count_include_pad={mod.count_include_pad}"
        return (
            f"nnx.{fn}({{x}}, window_shape={window}, strides={strides}, padding={padding}{extra})"
        )
    if kind is nn.AdaptiveAvgPool2d:
        if pair(mod.output_size) != (1, 1):
            raise UnsupportedModuleError("AdaptiveAvgPool2d to a size other than (1, 1)")
        return "jnp.mean({x}, axis=(1, 2), keepdims=True)"
    raise UnsupportedModuleError(f"{kind.__name__} is not a supported layer")


def as_function(code: str) -> str:
    """A function value for ``nnx.Sequential`` from inline code: ``nnx.relu``,
    ``partial(nnx.max_pool, window_shape=...)``, or a lambda."""
    if code == "{x}":
        return "lambda x: x"
    head, _, rest = code.partition("({x}")
    if head.isidentifier() or head.replace(".", "").isidentifier():
        if rest == ")":
            return head
        if rest.startswith(", ") and "{x}" not in rest:
            return f"partial({head}{rest}"
    return "lambda x: " + code.format(x="x")


def layer_ctor(mod: nn.Module, hp: str, in_rank: int | None) -> tuple[Ctor, dict]:
    """NNX constructor of a layer with state and its weight table (torch name -> nnx, layout)."""
    kind, rngs = type(mod), ("rngs", "rngs", Code("rngs"), "")

    def arg(name, value, keyword=True):
        return (name if keyword else None, f"{hp}_{name}", value, "")

    def off(**flags):  # use_bias/use_scale: written only when off (both defaults are on)
        return [arg(name, False) for name, on in flags.items() if not on]

    def needs_rank(ok: tuple[int, ...]):
        if in_rank is not None and in_rank not in ok:
            raise UnsupportedModuleError(
                f"{kind.__name__} on a {in_rank}-D input (supported: {ok}-D; 4-D values are "
                "NHWC images in Flax, which this layer would read differently)"
            )

    affine = {"weight": ("scale", None), "bias": ("bias", None)}
    if kind is nn.Linear:
        needs_rank((1, 2, 3))
        args = [
            arg("in_features", mod.in_features, False),
            arg("out_features", mod.out_features, False),
        ]
        ctor = Ctor("nnx.Linear", args + off(use_bias=mod.bias is not None) + [rngs])
        return ctor, {"weight": ("kernel", (1, 0)), "bias": ("bias", None)}
    if kind is nn.Conv2d:
        needs_rank((4,))
        if mod.padding_mode != "zeros":
            raise UnsupportedModuleError(f"Conv2d with padding_mode={mod.padding_mode!r}")
        dilation, kernel = pair(mod.dilation), pair(mod.kernel_size)
        if mod.padding == "same":  # torch puts the odd pixel at the end, as here
            total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            pad = [(t // 2, t - t // 2) for t in total]
        else:
            pad = [(p, p) for p in pair(0 if mod.padding == "valid" else mod.padding)]
        args = [
            arg("in_features", mod.in_channels, False),
            arg("out_features", mod.out_channels, False),
            arg("kernel_size", kernel),
            arg("strides", pair(mod.stride)),
            arg("padding", "VALID" if pad == [(0, 0), (0, 0)] else pad),
        ]
        if dilation != (1, 1):
            args.append(arg("kernel_dilation", dilation))
        if mod.groups != 1:
            args.append(arg("feature_group_count", mod.groups))
        ctor = Ctor("nnx.Conv", args + off(use_bias=mod.bias is not None) + [rngs])
        return ctor, {"weight": ("kernel", (2, 3, 1, 0)), "bias": ("bias", None)}  # OIHW -> HWIO
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        needs_rank((2,) if kind is nn.BatchNorm1d else (4,))
        if mod.momentum is None or not mod.track_running_stats:
            raise UnsupportedModuleError(f"{kind.__name__} without running statistics/momentum")
        args = [
            arg("num_features", mod.num_features, False),
            arg("momentum", round(1.0 - mod.momentum, 12)),  # flax keeps `momentum` of the old
            arg("epsilon", mod.eps),
            *off(use_scale=mod.affine, use_bias=mod.affine),
            arg("use_fast_variance", False),  # torch's two-pass variance
        ]
        stats = {"running_mean": ("mean", None), "running_var": ("var", None)}
        return Ctor("nnx.BatchNorm", args + [rngs]), affine | stats | {"num_batches_tracked": None}
    if kind is nn.LayerNorm:
        needs_rank((1, 2, 3))
        if len(mod.normalized_shape) != 1:
            raise UnsupportedModuleError("LayerNorm over more than the last dimension")
        scale = mod.elementwise_affine
        args = [
            arg("num_features", mod.normalized_shape[0], False),
            arg("epsilon", mod.eps),
            *off(use_scale=scale, use_bias=scale and mod.bias is not None),
            arg("use_fast_variance", False),  # torch's two-pass variance
        ]
        return Ctor("nnx.LayerNorm", args + [rngs]), affine
    if kind is nn.GroupNorm:
        needs_rank((2, 4))
        args = [
            arg("num_features", mod.num_channels, False),
            arg("num_groups", mod.num_groups),
            arg("epsilon", mod.eps),
            *off(use_scale=mod.affine, use_bias=mod.affine),
            arg("use_fast_variance", False),  # torch's two-pass variance
        ]
        return Ctor("nnx.GroupNorm", args + [rngs]), affine
    if kind is nn.Embedding:
        if mod.max_norm is not None:
            raise UnsupportedModuleError("Embedding with max_norm")
        args = [
            arg("num_embeddings", mod.num_embeddings, False),
            arg("features", mod.embedding_dim, False),
        ]
        return Ctor("nnx.Embed", args + [rngs]), {"weight": ("embedding", None)}
    if kind is nn.Dropout:
        return Ctor("nnx.Dropout", [arg("rate", mod.p, False), rngs]), {}
    raise UnsupportedModuleError(f"{kind.__name__} is not a supported layer")


# --- layers written out in full: torch's recurrent and attention layers -----------------------
# Flax's own LSTM/GRU cells and MultiHeadAttention split torch's stacked weights differently
# (and GRU's candidate gate puts its bias elsewhere); these classes keep torch's parameter names
# and layouts instead, so the weights load unchanged, and compute torch's equations.

_RECURRENT = '''class TorchRNN(nnx.Module):
    """A stack of recurrent layers with torch's weight names and layouts (gates stacked on
    the rows of ``weight_ih_l{k}`` and ``weight_hh_l{k}``); ``cell`` is the layer's update."""

    gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        rngs: nnx.Rngs,
    ):
        self.hidden_size, self.num_layers, self.batch_first = hidden_size, num_layers, batch_first
        self.directions = 2 if bidirectional else 1
        bound = hidden_size**-0.5  # torch's initialisation: U(-1/sqrt(H), 1/sqrt(H))

        def param(*shape):
            return nnx.Param(jax.random.uniform(rngs.params(), shape, minval=-bound, maxval=bound))

        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * self.directions
            for suffix in ("", "_reverse")[: self.directions]:
                rows = self.gates * hidden_size
                setattr(self, f"weight_ih_l{layer}{suffix}", param(rows, width))
                setattr(self, f"weight_hh_l{layer}{suffix}", param(rows, hidden_size))
                setattr(self, f"bias_ih_l{layer}{suffix}", param(rows) if bias else None)
                setattr(self, f"bias_hh_l{layer}{suffix}", param(rows) if bias else None)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)  # between layers, as torch

    def projections(self, name: str, x: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x W_ih^T + b_ih, h W_hh^T + b_hh) of one layer and direction: (B, gates * H) each."""
        gi = x @ getattr(self, f"weight_ih_{name}")[...].T
        gh = h @ getattr(self, f"weight_hh_{name}")[...].T
        if getattr(self, f"bias_ih_{name}") is not None:
            gi = gi + getattr(self, f"bias_ih_{name}")[...]
            gh = gh + getattr(self, f"bias_hh_{name}")[...]
        return gi, gh

    def run(self, x: jax.Array, carries: list) -> tuple[jax.Array, list]:
        """x (T, B, I) through every layer; carries[k] is layer/direction k's initial state."""
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for d, suffix in enumerate(("", "_reverse")[: self.directions]):
                name = f"l{layer}{suffix}"

                def step(carry, x_t, name=name):
                    carry = self.cell(name, x_t, carry)
                    return carry, carry[0] if isinstance(carry, tuple) else carry

                seq = x if d == 0 else x[::-1]
                final, ys = jax.lax.scan(step, carries[layer * self.directions + d], seq)
                outputs.append(ys if d == 0 else ys[::-1])  # (T, B, H)
                finals.append(final)
            x = jnp.concatenate(outputs, axis=-1)  # (T, B, D*H)
            if layer < self.num_layers - 1:
                x = self.dropout(x)
        return x, finals

    def __call__(self, x: jax.Array, state=None):
        unbatched = x.ndim == 2
        x = x[:, None] if unbatched else (jnp.swapaxes(x, 0, 1) if self.batch_first else x)
        shape = (self.num_layers * self.directions, x.shape[1], self.hidden_size)
        out, finals = self.run(x, self.initial(state, shape, unbatched, x.dtype))
        out = out[:, 0] if unbatched else (jnp.swapaxes(out, 0, 1) if self.batch_first else out)
        return out, self.final(finals, unbatched)
'''

_LSTM = '''class LSTM(TorchRNN):
    """torch.nn.LSTM: gates (i, f, g, o); returns (output, (h_n, c_n))."""

    gates = 4

    def cell(self, name, x, carry):
        h, c = carry
        gi, gh = self.projections(name, x, h)
        i, f, g, o = jnp.split(gi + gh, 4, axis=-1)
        c = nnx.sigmoid(f) * c + nnx.sigmoid(i) * jnp.tanh(g)
        return nnx.sigmoid(o) * jnp.tanh(c), c

    def initial(self, state, shape, unbatched, dtype):
        h0, c0 = state if state is not None else (jnp.zeros(shape, dtype),) * 2
        h0, c0 = (h0[:, None], c0[:, None]) if unbatched else (h0, c0)
        return list(zip(h0, c0, strict=True))

    def final(self, finals, unbatched):
        h, c = jnp.stack([f[0] for f in finals]), jnp.stack([f[1] for f in finals])
        return (h[:, 0], c[:, 0]) if unbatched else (h, c)
'''

_GRU = '''class GRU(TorchRNN):
    """torch.nn.GRU: gates (r, z, n), the reset gate applied to W_hn h + b_hn; returns
    (output, h_n)."""

    gates = 3

    def cell(self, name, x, h):
        gi, gh = self.projections(name, x, h)
        i_r, i_z, i_n = jnp.split(gi, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
        r, z = nnx.sigmoid(i_r + h_r), nnx.sigmoid(i_z + h_z)
        n = jnp.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h

    def initial(self, state, shape, unbatched, dtype):
        h0 = state if state is not None else jnp.zeros(shape, dtype)
        return list(h0[:, None] if unbatched else h0)

    def final(self, finals, unbatched):
        h = jnp.stack(finals)
        return h[:, 0] if unbatched else h
'''

_ATTENTION = '''class MultiheadAttention(nnx.Module):
    """torch.nn.MultiheadAttention: q, k, v projections stacked in ``in_proj_weight`` (3D, D)
    as torch keeps them; returns (output, attention weights or None)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
        rngs: nnx.Rngs,
    ):
        self.num_heads, self.batch_first = num_heads, batch_first
        init = nnx.initializers.xavier_uniform()
        self.in_proj_weight = nnx.Param(init(rngs.params(), (3 * embed_dim, embed_dim)))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * embed_dim,))) if bias else None
        self.out_proj = nnx.Linear(embed_dim, embed_dim, use_bias=bias, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)  # on the attention weights, as torch

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        key_padding_mask: jax.Array | None = None,
        need_weights: bool = True,
        attn_mask: jax.Array | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,  # torch's hint that attn_mask is causal; the mask decides
    ):
        unbatched = query.ndim == 2
        q, k, v = (
            t[None] if unbatched else (t if self.batch_first else jnp.swapaxes(t, 0, 1))
            for t in (query, key, value)
        )  # (B, T, D), (B, S, D), (B, S, D)
        batch, length, dim = q.shape
        heads, width = self.num_heads, dim // self.num_heads
        w_q, w_k, w_v = jnp.split(self.in_proj_weight[...], 3)
        b_q, b_k, b_v = (
            jnp.split(self.in_proj_bias[...], 3) if self.in_proj_bias is not None else (0, 0, 0)
        )
        q = (q @ w_q.T + b_q).reshape(batch, length, heads, width)  # (B, T, N, H)
        k = (k @ w_k.T + b_k).reshape(batch, -1, heads, width)  # (B, S, N, H)
        v = (v @ w_v.T + b_v).reshape(batch, -1, heads, width)  # (B, S, N, H)
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(width).astype(q.dtype)
        if attn_mask is not None:  # (T, S) or (B*N, T, S); True (bool) = not attended
            mask = attn_mask
            if mask.ndim == 3:
                mask = mask.reshape(batch, heads, *mask.shape[-2:])
            scores = jnp.where(mask, -jnp.inf, scores) if mask.dtype == bool else scores + mask
        if key_padding_mask is not None:  # (B, S); True (bool) = padding
            pad = key_padding_mask.reshape(batch, 1, 1, -1)
            scores = jnp.where(pad, -jnp.inf, scores) if pad.dtype == bool else scores + pad
        weights = self.dropout(jax.nn.softmax(scores, axis=-1))  # (B, N, T, S)
        out = jnp.einsum("BNTS,BSNH->BTNH", weights, v).reshape(batch, length, dim)
        out = self.out_proj(out)  # (B, T, D)
        out = out[0] if unbatched else (out if self.batch_first else jnp.swapaxes(out, 0, 1))
        if not need_weights:
            return out, None
        weights = weights.mean(1) if average_attn_weights else weights
        return out, weights[0] if unbatched else weights
'''

WRITTEN_OUT = (nn.LSTM, nn.GRU, nn.MultiheadAttention)


def written_out_code(kind: type) -> list[tuple[str, str]]:
    """(class name, source) of the classes a WRITTEN_OUT layer needs, dependencies first."""
    if kind is nn.LSTM:
        return [("TorchRNN", _RECURRENT), ("LSTM", _LSTM)]
    if kind is nn.GRU:
        return [("TorchRNN", _RECURRENT), ("GRU", _GRU)]
    return [("MultiheadAttention", _ATTENTION)]


def written_out_ctor(mod: nn.Module, hp: str) -> tuple[Ctor, dict]:
    """Constructor of a WRITTEN_OUT layer's class and its weight table (names unchanged but
    ``out_proj``, an ``nnx.Linear``)."""
    kind, rngs = type(mod), ("rngs", "rngs", Code("rngs"), "")

    def arg(name, value, keyword=True):
        return (name if keyword else None, f"{hp}_{name}", value, "")

    if kind in (nn.LSTM, nn.GRU):
        if getattr(mod, "proj_size", 0):
            raise UnsupportedModuleError("LSTM with proj_size")
        args = [
            arg("input_size", mod.input_size, False),
            arg("hidden_size", mod.hidden_size, False),
            arg("num_layers", mod.num_layers),
            arg("bias", mod.bias),
            arg("batch_first", mod.batch_first),
            arg("dropout", float(mod.dropout)),
            arg("bidirectional", mod.bidirectional),
        ]
        table = {key: (key, None) for key, _ in mod.named_parameters()}
        return Ctor(kind.__name__, args + [rngs]), table
    if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
        raise UnsupportedModuleError(
            "MultiheadAttention with kdim/vdim other than embed_dim, add_bias_kv or add_zero_attn"
        )
    args = [
        arg("embed_dim", mod.embed_dim, False),
        arg("num_heads", mod.num_heads, False),
        arg("bias", mod.in_proj_bias is not None),
        arg("dropout", float(mod.dropout)),
        arg("batch_first", mod.batch_first),
    ]
    table = {
        "in_proj_weight": ("in_proj_weight", None),
        "in_proj_bias": ("in_proj_bias", None),
        "out_proj.weight": (("out_proj", "kernel"), (1, 0)),
        "out_proj.bias": (("out_proj", "bias"), None),
    }
    return Ctor("MultiheadAttention", args + [rngs]), table

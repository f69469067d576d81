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

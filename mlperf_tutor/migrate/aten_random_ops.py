"""The op table, part 5: the random ops beyond dropout, and the randomness the export would lose.

Every op that draws random numbers (PyTorch tags them ``nondeterministic_seeded``) is either
translated here or in :mod:`.aten_nn_ops` with a jax.random key first (the interpreter folds the
node's position into the step's key, so each site draws new numbers every step), or refused by
the interpreter's check, by name. :data:`RANDOM_OFF` gives the dropout ops a form without
randomness (rate 0), which :func:`mlperf_tutor.migrate.verify` runs in both frameworks.

``torch.export``'s decomposition of the recurrent layers (``_rnn_helper`` in
``torch/_decomp/decompositions.py``, torch 2.13) zeroes the dropout between layers: it sets
``dropout = dropout if (train and num_layers < i - 1) else 0.0``, which is never true. So a
``nn.LSTM(num_layers=2, dropout=0.3)`` would train without its dropout. :func:`rnn_decompositions`
replaces that decomposition for the ``.input`` overloads: one single-layer call per layer, with
``native_dropout`` between layers as PyTorch's kernel applies it; :func:`check_lost_randomness`
refuses the packed-sequence overloads (``.data``), which it does not rewrite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from mlperf_tutor.migrate.aten_nn_ops import _sdpa, require_key
from mlperf_tutor.migrate.aten_ops import aten, jax_dtype

# --- more random ops ------------------------------------------------------------------------


def _like(x, dtype):
    return jax_dtype(dtype) or x.dtype


@aten("uniform.default", random=True)
def _uniform(key, x, from_=0.0, to=1.0, *, generator=None):
    return jax.random.uniform(require_key(key), x.shape, x.dtype, from_, to)


@aten("normal.Tensor_float", random=True)
def _normal_tensor_mean(key, mean, std=1.0, *, generator=None):
    return mean + std * jax.random.normal(require_key(key), mean.shape, mean.dtype)


@aten("normal.float_Tensor", random=True)
def _normal_tensor_std(key, mean, std, *, generator=None):
    return mean + std * jax.random.normal(require_key(key), std.shape, std.dtype)


@aten("normal.Tensor_Tensor", random=True)
def _normal_tensors(key, mean, std, *, generator=None):
    shape = jnp.broadcast_shapes(mean.shape, std.shape)
    return mean + std * jax.random.normal(require_key(key), shape, jnp.result_type(mean, std))


@aten("normal.float_float", random=True)
def _normal_floats(key, mean, std, size, *, generator=None, dtype=None, **_):
    dtype = jax_dtype(dtype) or np.dtype(np.float32)
    return mean + std * jax.random.normal(require_key(key), tuple(size), dtype)


@aten("normal_functional.default", random=True)
def _normal_like(key, x, mean=0.0, std=1.0, *, generator=None):
    return mean + std * jax.random.normal(require_key(key), x.shape, x.dtype)


@aten("exponential.default", random=True)
def _exponential(key, x, lambd=1.0, *, generator=None):
    return jax.random.exponential(require_key(key), x.shape, x.dtype) / lambd


@aten("bernoulli.Tensor", random=True)
def _bernoulli_tensor(key, x, p, *, generator=None):
    return jax.random.bernoulli(require_key(key), p, x.shape).astype(x.dtype)


@aten("randint_like.default", "randint_like.low_dtype", random=True)
def _randint_like(key, x, *args, dtype=None, **_):
    low, high = (0, *args) if len(args) == 1 else args
    return jax.random.randint(require_key(key), x.shape, low, high, _like(x, dtype))


# --- the off switch verify uses -------------------------------------------------------------


def _dropout_off(x, p, train=True):
    return x, jnp.ones(x.shape, bool)


def _sdpa_off(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
    return _sdpa(None, q, k, v, attn_mask, 0.0, is_causal, **kwargs)


# name -> the op with its rate set to 0 (no key); the random ops missing here cannot be
# switched off by a rate (stochastic depth's rand/bernoulli): verify handles them by module.
RANDOM_OFF = {
    "aten.native_dropout.default": _dropout_off,
    "aten.dropout.default": lambda x, p, train=True: x,
    "aten.scaled_dot_product_attention.default": _sdpa_off,
}


def draws(node: torch.fx.Node) -> bool:
    """Whether this node of a core-ATen graph draws random numbers when it runs (a dropout
    with rate 0 or in eval mode and attention without dropout do not)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target is torch.ops.aten.scaled_dot_product_attention.default:
        rate = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        return bool(rate)
    if target in (torch.ops.aten.native_dropout.default, torch.ops.aten.dropout.default):
        p = node.args[1]
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return bool(p) and train is not False
    return torch.Tag.nondeterministic_seeded in target.tags


# --- the recurrent layers' dropout ----------------------------------------------------------

_aten = torch.ops.aten
# op -> whether its state is LSTM's [h, c] (else one tensor h)
_RNN_INPUT = {
    _aten.lstm.input: True,
    _aten.gru.input: False,
    _aten.rnn_tanh.input: False,
    _aten.rnn_relu.input: False,
}
_RNN_PACKED = (_aten.lstm.data, _aten.gru.data, _aten.rnn_tanh.data, _aten.rnn_relu.data)


def _layered(op, default, is_lstm: bool):
    def decompose(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, first):
        if not (dropout > 0 and train and num_layers > 1):
            args = (has_biases, num_layers, dropout, train, bidirectional, first)
            return default(x, hx, params, *args)
        d = 2 if bidirectional else 1
        per = len(params) // num_layers  # w_ih, w_hh[, b_ih, b_hh][, w_hr] per direction
        states = list(hx) if is_lstm else [hx]
        finals = [[] for _ in states]
        for i in range(num_layers):
            layer_hx = [s[i * d : (i + 1) * d] for s in states]
            layer = params[i * per : (i + 1) * per]
            out = op(
                x,
                layer_hx if is_lstm else layer_hx[0],
                layer,
                has_biases,
                1,
                0.0,
                train,
                bidirectional,
                first,
            )
            x = out[0]
            for final, value in zip(finals, out[1:], strict=True):
                final.append(value)
            if i < num_layers - 1:  # PyTorch's kernel: dropout on every layer's output but the last
                x = _aten.native_dropout.default(x, dropout, True)[0]
        return (x, *(torch.cat(f, 0) for f in finals))

    return decompose


def rnn_decompositions(table: dict) -> dict:
    """``table`` (a ``torch.export`` decomposition table) with the recurrent layers'
    decompositions replaced by ones that keep the dropout between layers."""
    table = dict(table)
    for op, is_lstm in _RNN_INPUT.items():
        default = table.get(op, op.decompose)
        table[op] = _layered(op, default, is_lstm)
    return table


def check_lost_randomness(program: torch.export.ExportedProgram) -> None:
    """Refuse ops whose decomposition would drop their dropout (packed-sequence RNNs with
    dropout between layers in train mode); call before ``run_decompositions``."""
    from mlperf_tutor.migrate.interpreter import UnsupportedOp, op_name, source_line

    problems = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in _RNN_PACKED:
            continue
        num_layers, dropout, train = node.args[5:8]
        if dropout > 0 and train and num_layers > 1:
            module = _module_of(node)
            why = (
                f"the {module} has dropout={dropout} between layers on a packed sequence, which "
                "torch.export's decomposition drops; pass a padded tensor instead of a "
                "PackedSequence, or stack single-layer RNNs with nn.Dropout between them"
            )
            problems.append((op_name(node.target), source_line(node), why))
    if problems:
        raise UnsupportedOp(problems)


def module_path(node: torch.fx.Node) -> str | None:
    """The name (as ``model.named_modules()`` gives it, "" for the model itself) of the innermost
    module whose forward made ``node``; None when ``loss_fn`` made it outside the model."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()]
    inner = [p for p in paths if p == "model" or p.startswith("model.")]
    return inner[-1].removeprefix("model").removeprefix(".") if inner else None


def _module_of(node: torch.fx.Node) -> str:
    """``module 'rnn' (torch.nn.modules.rnn.LSTM)``: the innermost module that made ``node``."""
    path = module_path(node)
    if path is None:
        return "loss_fn"
    kind = list((node.meta.get("nn_module_stack") or {}).values())[-1][1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
    return f"module '{path}' ({kind})" if path else f"model's forward ({kind})"

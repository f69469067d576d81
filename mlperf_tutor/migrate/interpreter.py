"""Runs an exported PyTorch graph (core ATen ops) with jax: one op-table lookup per node.

:class:`GraphFunction` checks every node once when it is built (an op without a translation
raises :class:`UnsupportedOp` then, naming the op and the user's source line), and afterwards
is a pure function of jax arrays: under ``jax.jit`` the graph is walked once, while tracing.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.node import map_arg

# Importing the op modules fills the table.
from mlperf_tutor.frameworks.torch import to_numpy
from mlperf_tutor.migrate import aten_nn_ops, aten_reduce_ops, aten_shape_ops  # noqa: F401
from mlperf_tutor.migrate.aten_ops import CHECKS, OPS, RANDOM_OPS, jax_dtype
from mlperf_tutor.migrate.aten_random_ops import RANDOM_OFF, draws, module_path

_TORCH_DIR = os.path.dirname(torch.__file__)
_MIGRATE_DIR = os.path.dirname(__file__)
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (.+)$')
_FOLD_LIMIT = 1 << 16  # elements; larger constants are computed inside the compiled graph
HOW_TO_ASK = (
    "To ask for an op, open an issue on mlperf_tutor with the op name and the source line above. "
    "To add it yourself, register a jax implementation before translate(): "
    '@mlperf_tutor.migrate.aten_ops.register("<op name>") on a function taking the op\'s '
    "arguments (jax arrays for tensors) and returning jax arrays."
)


class UnsupportedOp(NotImplementedError):
    """The graph uses ops (or arguments of ops) that have no JAX translation.

    Attributes:
        ops: (op name, where it comes from in the user's code, reason or None) per problem.
    """

    def __init__(self, ops: list[tuple[str, str, str | None]]):
        self.ops = ops
        lines = []
        for name, where, why in ops:
            lines.append(f"{name} ({why})" if why else f"{name} has no JAX translation")
            lines.append(f"  at {where}")
        head = "unsupported PyTorch op" + ("s" if len(ops) > 1 else "")
        super().__init__(f"{head} in the exported graph:\n" + "\n".join(lines) + "\n" + HOW_TO_ASK)


class OpError(RuntimeError):
    """An op's translation failed while running; names the op and the user's source line."""


def op_name(target: Any) -> str:
    """``aten.add.Tensor`` for ATen overloads; ``module.name`` for Python callables."""
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}"


def source_line(node: torch.fx.Node) -> str:
    """``file:line in function: code`` of the innermost frame of the user's code that made
    ``node`` (frames inside torch and this package are skipped)."""
    frames = []  # (path, line, function, code)
    for text in (node.meta.get("stack_trace") or "").splitlines():
        match = _FRAME.match(text)
        if match:
            frames.append([*match.groups(), ""])
        elif frames and not frames[-1][3]:
            frames[-1][3] = text  # the frame's source line, when the file has one
    if not frames:
        return "(no source line recorded)"
    # Skipped: torch, this package and the code torch.fx generates ("<eval_with_key>.3").
    outside = [f for f in frames if not f[0].startswith((_TORCH_DIR, _MIGRATE_DIR, "<eval"))]
    path, line, function, code = (outside or frames)[-1]
    return f"{path}:{line} in {function}" + (f": {code.strip()}" if code.strip() else "")


def _static_shape(meta: torch.Tensor) -> tuple[int, ...] | None:
    # Symbolic sizes (a dynamic batch dimension) have no fixed value; int() would give the
    # example's size, its hint.
    if any(isinstance(s, torch.SymInt) for s in meta.shape):
        return None
    try:
        return tuple(int(s) for s in meta.shape)
    except (TypeError, ValueError):
        return None


class GraphFunction:
    """A jax function equivalent to one ``torch.export`` program.

    Args:
        program: an ``ExportedProgram`` after ``run_decompositions``.
        prefix: stripped from parameter and buffer names (the wrapper module's attribute).
        aliases: name -> the name it shares its tensor with (tied weights): both read one
            state entry, so its gradient sums over both uses, as in PyTorch.

    Attributes:
        parameters: parameter names (after ``prefix``) in placeholder order.
        buffers: buffer names read from the state (persistent or mutated buffers).
        mutated: buffer names whose new values the graph returns (BatchNorm statistics).
        num_user_inputs: how many tensors of the batch the graph takes.
        random_off: run every dropout with rate 0 (no key needed), as
            :func:`mlperf_tutor.migrate.verify` does; other random ops then raise. Set it
            before the function is first traced.
    """

    random_off = False

    def __init__(
        self,
        program: torch.export.ExportedProgram,
        prefix: str = "",
        aliases: Mapping[str, str] | None = None,
    ):
        self.graph = program.graph_module.graph
        aliases = aliases or {}

        def strip(target: str) -> str:
            # Tied tensors arrive as one placeholder per name; they read one state entry.
            name = target[len(prefix) :] if target.startswith(prefix) else target
            return aliases.get(name, name)

        self._sources: dict[str, tuple[str, Any]] = {}  # placeholder -> (kind, name or value)
        self.parameters, self.buffers, self.mutated = [], [], []
        constants = program.constants
        mutated_targets = {
            spec.target
            for spec in program.graph_signature.output_specs
            if spec.kind == OutputKind.BUFFER_MUTATION
        }
        self.num_user_inputs = 0
        for spec in program.graph_signature.input_specs:
            name = spec.arg.name
            if spec.kind == InputKind.PARAMETER:
                self.parameters.append(strip(spec.target))
                self._sources[name] = ("state", strip(spec.target))
            elif spec.kind == InputKind.BUFFER and (
                spec.persistent or spec.target in mutated_targets
            ):
                self.buffers.append(strip(spec.target))
                self._sources[name] = ("state", strip(spec.target))
            elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                self._sources[name] = ("constant", _to_numpy(constants[spec.target]))
            elif spec.kind == InputKind.USER_INPUT:
                self._sources[name] = ("user", self.num_user_inputs)
                self.num_user_inputs += 1
            else:
                what = f"graph input {name} of kind {spec.kind.name}"
                raise UnsupportedOp([(what, "the exported graph's signature", None)])
        self._outputs: list[tuple[str, str | None]] = []  # ("user" | "buffer" | "drop", name)
        for spec in program.graph_signature.output_specs:
            if spec.kind == OutputKind.USER_OUTPUT:
                self._outputs.append(("user", None))
            elif spec.kind == OutputKind.BUFFER_MUTATION:
                self.mutated.append(strip(spec.target))
                self._outputs.append(("buffer", strip(spec.target)))
            elif spec.kind == OutputKind.USER_INPUT_MUTATION:
                self._outputs.append(("drop", None))  # in-place writes into the batch
            else:
                what = f"graph output {spec.arg} of kind {spec.kind.name}"
                raise UnsupportedOp([(what, "the exported graph's signature", None)])
        self._check()
        self._folded = self._fold_constants()

    def _fold_constants(self) -> dict[torch.fx.Node, Any]:
        """Values of the nodes that depend on no input (positions, masks, bag offsets), computed
        once now. Concrete values let ops take static fast paths under jit (equal-size bags
        become a reshape); large results are left to the compiled graph."""
        folded: dict[torch.fx.Node, Any] = {}
        for index, node in enumerate(self.graph.nodes):
            if node.op == "placeholder" and self._sources[node.name][0] == "constant":
                value = self._sources[node.name][1]
                if value.size <= _FOLD_LIMIT:
                    folded[node] = jnp.asarray(value)
                continue
            if node.op != "call_function" or op_name(node.target) in RANDOM_OPS:
                continue
            if not all(n in folded for n in node.all_input_nodes):
                continue
            try:
                value = self._run(node, index, folded, None)
            except Exception:  # left to the traced graph, where errors name the node
                continue
            sizes = [jnp.size(v) for v in (value if isinstance(value, tuple) else (value,))]
            if sum(sizes) <= _FOLD_LIMIT:
                folded[node] = value
        return folded

    def _check(self) -> None:
        problems = []
        for node in self.graph.nodes:
            if node.op in ("call_module", "call_method"):
                problems.append((f"{node.op} {node.target}", source_line(node), None))
            if node.op != "call_function" or node.target is operator.getitem:
                continue
            name = op_name(node.target)
            seeded = isinstance(node.target, torch._ops.OpOverload) and (
                torch.Tag.nondeterministic_seeded in node.target.tags
            )
            if seeded and name not in RANDOM_OPS:
                # Translated without a key it would draw the same numbers every step, or none.
                why = (
                    "it draws random numbers and has no translation with per-step keys; "
                    "register one with register(..., random=True), or leave it out of the step"
                )
                problems.append((name, source_line(node), why))
            elif name not in OPS:
                problems.append((name, source_line(node), None))
            elif name in CHECKS and (why := CHECKS[name](node)):
                problems.append((name, source_line(node), why))
        if problems:
            raise UnsupportedOp(problems)

    def ops(self) -> list[str]:
        """The distinct op names the graph calls, sorted."""
        return sorted(
            {op_name(n.target) for n in self.graph.nodes if n.op == "call_function"}
            - {op_name(operator.getitem)}
        )

    def random_sites(self) -> list[tuple[str, str, str | None]]:
        """(op name, source line, module name or None for loss_fn) of every node that draws
        random numbers when it runs (dropout with a rate, rand, bernoulli, ...)."""
        return [
            (op_name(n.target), source_line(n), module_path(n))
            for n in self.graph.nodes
            if n.op == "call_function" and draws(n)
        ]

    def __call__(
        self, state: Mapping[str, Any], user_inputs: Sequence[Any], key: Any = None
    ) -> tuple[list[Any], dict[str, Any]]:
        """Run the graph.

        Args:
            state: parameter and buffer name -> array (every name in ``parameters`` and
                ``buffers``).
            user_inputs: the batch's tensors in the graph's order.
            key: jax.random key for the random ops (None when there are none).

        Returns:
            (user outputs, {mutated buffer name: new value}).
        """
        env: dict[torch.fx.Node, Any] = dict(self._folded)
        for index, node in enumerate(self.graph.nodes):
            if node in env:
                continue
            if node.op == "placeholder":
                kind, source = self._sources[node.name]
                if kind == "state":
                    value = state[source]
                elif kind == "user":
                    value = user_inputs[source]
                else:
                    value = source
                env[node] = value if value is None else jnp.asarray(value)
            elif node.op == "call_function":
                env[node] = self._run(node, index, env, key)
            elif node.op == "output":
                values = map_arg(node.args[0], env.__getitem__)
        users, mutated = [], {}
        for (kind, name), value in zip(self._outputs, values, strict=True):
            if kind == "user":
                users.append(value)
            elif kind == "buffer":
                mutated[name] = value
        return users, mutated

    def _run(self, node: torch.fx.Node, index: int, env: dict, key: Any) -> Any:
        args = map_arg(node.args, env.__getitem__)
        kwargs = map_arg(node.kwargs, env.__getitem__)
        if node.target is operator.getitem:
            value = args[0][args[1]]
        else:
            name = op_name(node.target)
            if self.random_off and name in RANDOM_OPS and draws(node):
                if name not in RANDOM_OFF:
                    raise OpError(
                        f"{name} at {source_line(node)} draws random numbers that cannot be "
                        "switched off by a rate"
                    )
                return _conform(RANDOM_OFF[name](*args, **kwargs), node)
            if name in RANDOM_OPS:
                # Fold the node's position into the step key: each random site differs.
                args = (None if key is None else jax.random.fold_in(key, index), *args)
            try:
                value = OPS[name](*args, **kwargs)
            except Exception as error:
                raise OpError(f"{name} failed at {source_line(node)}: {error}") from error
        return _conform(value, node)


def _conform(value: Any, node: torch.fx.Node) -> Any:
    """Give a tensor result the dtype PyTorch recorded for the node (type promotion then
    matches PyTorch's, not jax's) and check its shape (a mismatch is a bug in the op table)."""
    meta = node.meta.get("val")
    if not isinstance(meta, torch.Tensor) or value is None:
        return value
    value = jnp.asarray(value)
    dtype = jax_dtype(meta.dtype)
    if value.dtype != dtype:
        value = value.astype(dtype)
    shape = _static_shape(meta)
    if shape is not None and value.shape != shape:
        raise OpError(
            f"{op_name(node.target)} gave shape {value.shape}, PyTorch {shape}, at "
            f"{source_line(node)} (a bug in mlperf_tutor.migrate's op table; please report it)"
        )
    return value


def _to_numpy(value: Any) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        what = f"constant of type {type(value).__name__}"
        raise UnsupportedOp([(what, "the exported graph's signature", None)])
    return to_numpy(value)

"""PyTorch model + loss -> a pure JAX loss function, through ``torch.export``.

``translate`` wraps ``loss_fn(model, batch)`` in a module, exports it twice (train mode and
eval mode), lowers both graphs to core ATen ops (``run_decompositions``) and hands them to the
interpreter. What the graph signature says about each input (parameter, buffer, constant,
batch) and output (loss, updated buffer) becomes the arguments and results of ``apply``.

Two things the decompositions would lose are kept on purpose: ``detach`` and ``torch.no_grad``
regions (the decompositions turn ``detach`` into an alias and inline the region, so gradients
would flow through them) become a ``stop_gradient`` op; and
``scaled_dot_product_attention`` stays one op, so jax runs one attention instead of a
decomposition of PyTorch's math fallback.

The batch's leading dimension is exported as a dynamic dimension where the model allows it, so
a smaller last batch runs the same graph; ``autocast="bf16"`` exports under ``torch.autocast``,
whose casts the graph then records. A tied parameter is lifted once per name (``torch.export``
routes its uses through one of them); every name reads one state entry, the first name's.

References: https://pytorch.org/docs/stable/export.html (graph signature, decompositions).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from torch.utils import _pytree as pytree

from mlperf_tutor.frameworks.torch import from_numpy, to_numpy
from mlperf_tutor.migrate.aten_ops import OPS, jax_dtype, register
from mlperf_tutor.migrate.aten_random_ops import check_lost_randomness, rnn_decompositions
from mlperf_tutor.migrate.interpreter import GraphFunction, UnsupportedOp, op_name

PREFIX = "model."  # the wrapper's attribute: parameter targets read "model.<state_dict name>"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16}  # translate(autocast=...) -> torch.autocast dtype


def _define_stop_gradient() -> Any:
    # A custom op survives run_decompositions untouched; the interpreter maps it to
    # lax.stop_gradient. Defined once per process (re-imports reuse it).
    if hasattr(torch.ops.mlperf_tutor, "stop_gradient"):
        return torch.ops.mlperf_tutor.stop_gradient.default

    @torch.library.custom_op("mlperf_tutor::stop_gradient", mutates_args=())
    def stop_gradient(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    stop_gradient.register_fake(lambda x: torch.empty_like(x))
    stop_gradient.register_autograd(lambda ctx, grad: None)
    return torch.ops.mlperf_tutor.stop_gradient.default


STOP_GRADIENT = _define_stop_gradient()


def _register_size_arithmetic() -> None:
    # A graph exported with a dynamic batch dimension computes sizes (view shapes, arange ends)
    # with Python operators on symbolic ints; under jax.jit the shapes are Python ints, so the
    # operators themselves are the translation.
    python = [
        *(operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv),
        *(operator.mod, operator.pow, operator.neg, operator.eq, operator.ne, operator.lt),
        *(operator.le, operator.gt, operator.ge, operator.and_, operator.or_),
    ]
    symbolic = {
        torch.sym_max: max,
        torch.sym_min: min,
        torch.sym_not: operator.not_,
        torch.sym_float: float,
        torch.sym_int: int,
        torch.sym_sum: sum,
        torch.sym_ite: lambda cond, a, b: a if cond else b,
    }
    for fn, impl in [*((f, f) for f in python), *symbolic.items()]:
        if op_name(fn) not in OPS:
            register(op_name(fn))(impl)


_register_size_arithmetic()
# Ops jax runs better whole than as PyTorch's decomposition.
KEEP = (torch.ops.aten.scaled_dot_product_attention.default,)


class ExportError(RuntimeError):
    """``torch.export`` could not trace the model and loss (the cause is chained)."""


class _Loss(torch.nn.Module):
    """``forward(batch) = loss_fn(model, batch)``; the model is the only submodule, so
    parameter names are ``"model." + state_dict name``."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, autocast: str | None = None):
        super().__init__()
        self.model = model
        self.__dict__["loss_fn"] = loss_fn  # not a submodule even when it is a Module
        self.autocast = autocast

    def forward(self, batch):
        if self.autocast is None:
            return self.loss_fn(self.model, batch)
        # torch's own CPU autocast policy decides which ops run in bf16; export records its
        # decisions as explicit casts (``_to_copy``), which the interpreter then runs.
        with torch.autocast("cpu", dtype=AUTOCAST_DTYPES[self.autocast]):
            return self.loss_fn(self.model, batch)


def _keep_gradient_stops(program: torch.export.ExportedProgram) -> None:
    """Rewrite ``detach`` and the outputs of ``no_grad`` regions as :data:`STOP_GRADIENT`."""
    graph = program.graph_module.graph
    set_grad = torch.ops.higher_order.wrap_with_set_grad_enabled
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (torch.ops.aten.detach.default, torch.ops.aten.detach_.default):
            node.target = STOP_GRADIENT
        elif node.target is set_grad and node.args[0] is False:
            for user in list(node.users):  # the region's outputs, one getitem each
                if user.target is not operator.getitem:
                    continue
                with graph.inserting_after(user):
                    stop = graph.call_function(STOP_GRADIENT, (user,))
                stop.meta = dict(user.meta)
                # Graph outputs keep their node (the signature names it); no gradient flows
                # through them back into this graph anyway.
                user.replace_all_uses_with(
                    stop, delete_user_cb=lambda u, stop=stop: u is not stop and u.op != "output"
                )
    program.graph_module.recompile()


def export_loss(
    model: torch.nn.Module,
    loss_fn: Callable,
    batch: Any,
    train: bool,
    autocast: str | None = None,
    dynamic_shapes: Any = None,
) -> torch.export.ExportedProgram:
    """The core-ATen program of ``loss_fn(model, batch)`` in train or eval mode.

    Train mode keeps the modes of a model already in train mode (a BatchNorm the user froze
    with ``.eval()`` stays frozen) and switches a model in eval mode to ``train()``. Every
    module's mode is restored afterwards. ``autocast`` ("bf16" or None) runs the loss under
    ``torch.autocast("cpu", dtype=torch.bfloat16)``; ``dynamic_shapes`` is passed to
    ``torch.export.export`` for the batch (see :func:`_batch_dims`).
    """
    modes = {m: m.training for m in model.modules()}
    try:
        if not train:
            model.eval()
        elif not model.training:
            model.train()
        try:
            program = torch.export.export(
                _Loss(model, loss_fn, autocast),
                (batch,),
                dynamic_shapes=None if dynamic_shapes is None else (dynamic_shapes,),
            )
        except Exception as error:
            raise ExportError(
                f"torch.export could not trace loss_fn(model, batch) in "
                f"{'train' if train else 'eval'} mode: {error}. The forward must be traceable "
                "by torch.export (no Python branches on tensor values, no .item(), no "
                "numpy calls on tensors)."
            ) from error
    finally:
        for module, mode in modes.items():
            module.training = mode
    _keep_gradient_stops(program)
    check_lost_randomness(program)
    # The recurrent layers' own decomposition drops their dropout between layers.
    table = rnn_decompositions(torch.export.default_decompositions())
    for op in KEEP:
        table.pop(op, None)
    return program.run_decompositions(table)


def _as_torch(batch: Any) -> Any:
    def leaf(x):
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
            return from_numpy(np.asarray(x))
        return x

    return pytree.tree_map(leaf, batch)


def _path_keys(path) -> tuple:
    keys = []
    for entry in path:
        if isinstance(entry, pytree.MappingKey):
            keys.append(entry.key)
        elif isinstance(entry, pytree.SequenceKey):
            keys.append(entry.idx)
        else:
            raise TypeError(f"unsupported batch container entry {entry!r}; use dicts and tuples")
    return tuple(keys)


def _fetch(batch: Any, keys: tuple) -> Any:
    for k in keys:
        batch = batch[k]
    return batch


def _describe(keys: tuple) -> str:
    return "batch" + "".join(f"[{k!r}]" for k in keys)


@dataclasses.dataclass(eq=False)
class Translation:
    """A PyTorch loss as pure JAX functions, with the model's arrays.

    Attributes:
        params: trainable parameters (``requires_grad``), state_dict names and layouts, in
            ``state_dict`` order. A tied parameter is one entry, under its first name.
        buffers: persistent buffers (BatchNorm running statistics, ``num_batches_tracked``,
            ...), in ``state_dict`` order, then the non-persistent buffers the forward
            updates; other non-persistent buffers are baked into the graph as constants.
        frozen: parameters with ``requires_grad=False`` (a LoRA base), in ``state_dict`` order.
        aliases: second and later names of a tied tensor -> the name its entry is under
            (``{"lm_head.weight": "transformer.wte.weight"}`` for a tied LM head).
        batch_range: (min, max or None) leading sizes the graphs take, when they were exported
            with a dynamic batch dimension; None when every shape is fixed.
        train_program, eval_program: the core-ATen programs the functions run.
    """

    params: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    frozen: dict[str, np.ndarray]
    aliases: dict[str, str]
    batch_range: tuple[int, int | None] | None
    train_program: torch.export.ExportedProgram
    eval_program: torch.export.ExportedProgram
    _train: GraphFunction
    _eval: GraphFunction
    # (path, shape, dtype) per batch tensor; shape[0] is None where the batch size may vary.
    _leaves: list[tuple[tuple, tuple[int | None, ...], Any]]

    def __repr__(self) -> str:
        count = lambda tree: sum(int(np.size(v)) for v in tree.values())  # noqa: E731
        return (
            f"Translation({len(self.params)} params ({count(self.params):,} values), "
            f"{len(self.buffers)} buffers, {len(self.frozen)} frozen ({count(self.frozen):,} "
            f"values), {len(self.ops())} distinct ops in the train graph)"
        )

    def _mismatch(self, shapes: list[tuple[int, ...]]) -> str | None:
        """Why batch tensors of these shapes (one per leaf) do not fit the graphs, or None."""
        batch_sizes = set()
        for (keys, want, _), shape in zip(self._leaves, shapes, strict=True):
            fits = len(shape) == len(want) and all(
                w is None or s == w for s, w in zip(shape, want, strict=True)
            )
            if fits and want and want[0] is None:
                low, high = self.batch_range
                fits = low <= shape[0] and (high is None or shape[0] <= high)
                batch_sizes.add(shape[0])
            if not fits:
                shown = tuple("B" if w is None else w for w in want)
                return f"{_describe(keys)} has shape {shape}; the graphs were exported for {shown}"
        if len(batch_sizes) > 1:
            dynamic = [
                f"{_describe(keys)} has shape {shape}"
                for (keys, want, _), shape in zip(self._leaves, shapes, strict=True)
                if want and want[0] is None
            ]
            return f"{', '.join(dynamic)}: their batch dimension B must have one size"
        return None

    def accepts(self, batch: Any) -> bool:
        """Whether :meth:`apply` takes ``batch`` (its tensors have shapes the graphs fit)."""
        try:
            shapes = [tuple(np.shape(_fetch(batch, keys))) for keys, _, _ in self._leaves]
        except (KeyError, IndexError, TypeError):
            return False
        return self._mismatch(shapes) is None

    def apply(self, params, buffers, frozen, batch, key=None, train: bool = True):
        """The loss and the buffers after the forward; pure and jit-able.

        ``train`` chooses the graph, so it is static: ``jax.jit(t.apply,
        static_argnames="train")``, or jit :meth:`apply` and :meth:`eval_apply` separately.

        Args:
            params, buffers, frozen: name -> array, as :attr:`params`, :attr:`buffers` and
                :attr:`frozen` (any pytree-compatible arrays; gradients flow from ``params``).
            batch: the example batch's structure (dicts/tuples) with arrays of its shapes; the
                leading dimension may differ where :attr:`batch_range` allows.
            key: a ``jax.random`` key for dropout and other random ops; needed only when the
                graph draws random numbers (dropout with p > 0 in train mode).
            train: the train-mode graph (batch statistics, dropout) or the eval-mode graph.

        Returns:
            (loss, new_buffers): new_buffers has every key of ``buffers``; in train mode the
            BatchNorm running statistics are updated, in eval mode they come back unchanged.
        """
        graph = self._train if train else self._eval
        inputs = []
        for keys, _, dtype in self._leaves:
            try:
                value = jnp.asarray(_fetch(batch, keys))
            except (KeyError, IndexError, TypeError) as error:
                raise ValueError(f"{_describe(keys)} is missing from the batch") from error
            inputs.append(value if dtype is None else value.astype(dtype))
        if why := self._mismatch([x.shape for x in inputs]):
            raise ValueError(
                f"{why} (translate again with a batch of the new shape; a migrated step does "
                "this by itself)"
            )
        outputs, mutated = graph({**frozen, **buffers, **params}, inputs, key)
        new_buffers = dict(buffers)
        new_buffers.update({k: v for k, v in mutated.items() if k in new_buffers})
        return outputs[0], new_buffers

    def eval_apply(self, params, buffers, frozen, batch, key=None):
        """``apply(..., train=False)``: the eval-mode loss and unchanged buffers."""
        return self.apply(params, buffers, frozen, batch, key, train=False)

    def ops(self, train: bool = True) -> list[str]:
        """The distinct ATen ops of the train (or eval) graph."""
        return (self._train if train else self._eval).ops()


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Second and later names of a tied tensor -> its first name (``named_parameters`` and
    ``named_buffers`` keep the first)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        aliases[name] = first.setdefault(id(tensor), name)
    return {k: v for k, v in aliases.items() if k != v}


def _batch_size(batch: Any) -> int | None:
    """The leading size of the batch's first tensor (None without one)."""
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.ndim:
            return int(leaf.shape[0])
    return None


def _batch_dims(batch: Any) -> Any:
    """``dynamic_shapes`` for the batch: one ``Dim`` on the leading dimension of every tensor
    whose leading size is the first tensor's; None where nothing can vary (no tensors, or a
    leading size of 0 or 1, which ``torch.export`` always specialises)."""
    size = _batch_size(batch)
    if size is None or size < 2:
        return None
    dim = torch.export.Dim("batch")

    def spec(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.ndim and leaf.shape[0] == size:
            return {0: dim}
        return None

    return pytree.tree_map(spec, batch)


def _batch_range(program: torch.export.ExportedProgram) -> tuple[int, int | None] | None:
    """(min, max or None) of the symbolic leading size of the program's batch inputs."""
    from torch.utils._sympy.numbers import int_oo

    users = {s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in users else None
        if isinstance(val, torch.Tensor) and val.ndim and isinstance(val.shape[0], torch.SymInt):
            bounds = program.range_constraints.get(val.shape[0].node.expr)
            if bounds is None:
                return None
            upper = None if bounds.upper in (int_oo, float("inf")) else int(bounds.upper)
            return max(int(bounds.lower), 1), upper
    return None


def _export_both(model, loss_fn, batch, aliases, autocast, dims):
    programs, graphs = {}, {}
    for mode in (True, False):  # the train graph is checked before the eval graph is exported
        programs[mode] = export_loss(model, loss_fn, batch, mode, autocast, dims)
        graphs[mode] = GraphFunction(programs[mode], prefix=PREFIX, aliases=aliases)
    return programs, graphs


def translate(
    model: torch.nn.Module,
    loss_fn: Callable,
    example_batch: Any,
    *,
    autocast: str | None = None,
    dynamic_batch: bool = True,
) -> Translation:
    """Translate ``loss_fn(model, batch)`` into pure JAX functions.

    Args:
        model: a ``torch.nn.Module`` (CPU); it is only read: its modes, parameters and
            buffers are left as they were.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the forward included.
        example_batch: a dict or tuple of tensors or numpy arrays; ``apply`` takes batches of
            the same structure, dtypes and shapes, except the leading (batch) dimension below.
        autocast: None, or "bf16" to run the loss under ``torch.autocast("cpu",
            dtype=torch.bfloat16)``: torch's CPU autocast policy picks the ops that compute in
            bf16 (matmuls, convolutions, ...) and the graph records its casts, so the
            translation runs the same ops in bf16 with the float32 parameters as masters.
        dynamic_batch: export with a dynamic leading dimension (``torch.export.Dim``) on every
            batch tensor whose leading size is the first tensor's, so batches of another size
            run without a new export. When the model's code specialises on the batch size
            (the dynamic export fails), or the example's leading size is 0 or 1, the shapes
            are fixed (``batch_range`` is None) and another size needs a new translation.

    Returns:
        a :class:`Translation`.

    Raises:
        ExportError: ``torch.export`` cannot trace the model.
        UnsupportedOp: the graph has ops without a JAX translation (all of them are named,
            each with the source line that made it); raised here, before any step runs.
        ValueError: an ``autocast`` other than None or "bf16".
    """
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(
            f"autocast={autocast!r} is not supported; use None or one of {list(AUTOCAST_DTYPES)}"
        )
    batch = _as_torch(example_batch)
    aliases = _aliases(model)
    dims = _batch_dims(batch) if dynamic_batch else None
    programs = graphs = None
    if dims is not None:
        try:
            programs, graphs = _export_both(model, loss_fn, batch, aliases, autocast, dims)
        except (ExportError, UnsupportedOp):
            dims = None  # the code specialises on the batch size: fixed shapes (errors below)
    if programs is None:
        programs, graphs = _export_both(model, loss_fn, batch, aliases, autocast, None)
    user_outputs = [
        s for s in programs[True].graph_signature.output_specs if s.kind.name == "USER_OUTPUT"
    ]
    if len(user_outputs) != 1:
        raise ValueError(f"loss_fn must return one scalar tensor, got {len(user_outputs)} outputs")

    batch_range = _batch_range(programs[True]) if dims is not None else None
    size = _batch_size(batch)
    leaves = []
    for path, leaf in pytree.tree_flatten_with_path(batch)[0]:
        if isinstance(leaf, torch.Tensor):
            shape = tuple(leaf.shape)
            if batch_range is not None and shape and shape[0] == size:
                shape = (None, *shape[1:])
            leaves.append((_path_keys(path), shape, jax_dtype(leaf.dtype)))
    for graph in graphs.values():
        if graph.num_user_inputs != len(leaves):
            raise UnsupportedOp(
                [
                    (
                        f"a batch with non-tensor leaves ({graph.num_user_inputs} graph inputs for "
                        f"{len(leaves)} tensors)",
                        "translate()",
                        None,
                    )
                ]
            )

    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    state = model.state_dict(keep_vars=True)
    used = set(graphs[True].parameters)
    params = {k: to_numpy(v) for k, v in state.items() if k in used and trainable.get(k, False)}
    frozen = {k: to_numpy(v) for k, v in state.items() if k in used and not trainable.get(k, True)}
    # Persistent buffers in state_dict order, then any non-persistent one the graph updates.
    named = {**dict(model.named_buffers()), **state}
    buffers = {k: to_numpy(named[k]) for k in named if k in graphs[True].buffers}
    return Translation(
        params=params,
        buffers=buffers,
        frozen=frozen,
        aliases=aliases,
        batch_range=batch_range,
        train_program=programs[True],
        eval_program=programs[False],
        _train=graphs[True],
        _eval=graphs[False],
        _leaves=leaves,
    )

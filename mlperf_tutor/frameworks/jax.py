"""The JAX adapter (Flax NNX + optax): the contract of :mod:`mlperf_tutor.frameworks`.

Layout rules map each Flax leaf to its canonical (PyTorch ``state_dict``) name and layout through
one table keyed by module type (:data:`LAYOUT_RULES`); a workload registers only real exceptions
with :func:`register_rules`. Modules without a rule that are not Flax layers keep their leaf
names and layouts, so a custom module written with ``weight``/``bias`` in PyTorch layout needs
nothing.

Trainable parameters are the ``nnx.Param`` leaves: gradients (``nnx.value_and_grad``'s default
filter), :func:`trainable_names` and the optimizer see only those. :func:`set_trainable` freezes a
parameter by swapping it for a :class:`Frozen` variable, which checkpoints (:func:`to_canonical`,
:func:`load_canonical`, :func:`init_empty`) still see.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mlperf_tutor.core.batch import check_model_batch
from mlperf_tutor.core.checkpoint import CheckpointMismatch, check_tree, spec_of
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec
from mlperf_tutor.frameworks.jax_optim import ArrayOptimizer as ArrayOptimizer  # contract
from mlperf_tutor.frameworks.jax_optim import (
    OptaxState,
    from_canonical_layout,
    make_transformation,
    to_canonical_layout,
)
from mlperf_tutor.frameworks.jax_optim import make_array_optimizer as make_array_optimizer

NAME = "jax"
M = TypeVar("M", bound=nnx.Module)


# --- arrays, seeding, precision, devices ---------------------------------------------------
def to_numpy(x) -> np.ndarray:
    """A numpy copy of a JAX array or NNX Variable (bfloat16 stays ``ml_dtypes.bfloat16``)."""
    if isinstance(x, nnx.Variable):
        x = x.get_value()
    return np.array(x)


def from_numpy(a, dtype=None) -> jax.Array:
    """A JAX array from a numpy array, optionally cast to ``dtype``."""
    return jnp.asarray(a, dtype=dtype)


def seed(n: int) -> jax.Array:
    """Seed Python's and numpy's global generators; return ``jax.random.key(n)``.

    JAX has no global generator: pass the returned key (or ``nnx.Rngs(n)``) explicitly.
    """
    random.seed(n)
    np.random.seed(n)
    return jax.random.key(n)


def pin_precision() -> None:
    """Full float32 matmuls and convolutions (no TF32 / bf16 passes on GPU and TPU)."""
    jax.config.update("jax_default_matmul_precision", "highest")


def devices() -> list[str]:
    """The devices JAX sees, e.g. ``["TFRT_CPU_0"]`` or ``["cuda:0", "cuda:1"]``."""
    return [str(d) for d in jax.devices()]


def device_summary() -> str:
    """One line for notebooks, e.g. ``jax 0.10.2 on GPU: 2 x NVIDIA H100 80GB HBM3``."""
    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    return f"jax {jax.__version__} on {devs[0].platform.upper()}: {len(devs)} x {', '.join(kinds)}"


DEVICE_NAMES = ("auto", "cpu", "gpu", "tpu")
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def _device(name: str) -> jax.Device:
    """The JAX device of ``name``: "auto", "cpu", "gpu", "tpu", optionally with ":index", or a
    line :func:`use_device` returned ("gpu:0 (NVIDIA H100 80GB HBM3)")."""
    if isinstance(name, jax.Device):
        return name
    text = str(name).split(" (")[0].strip().lower()
    platform, _, index = text.partition(":")
    platform = _PLATFORM_ALIASES.get(platform, platform)
    if platform not in DEVICE_NAMES or (index and not index.isdigit()):
        raise ValueError(f"unknown device {name!r}; choose one of {list(DEVICE_NAMES)}")
    if platform == "auto":
        return jax.devices()[0]  # the default backend: the accelerator if there is one
    try:
        found = jax.devices(platform)
    except RuntimeError:  # "Unknown backend" / "failed to initialize": none on this machine
        raise ValueError(
            f"device {name!r}: no {platform.upper()} visible to jax; use --device cpu or auto"
        ) from None
    i = int(index or 0)
    if i >= len(found):
        raise ValueError(
            f"device {name!r}: jax sees {len(found)} {platform.upper()} device(s), numbered from 0"
        )
    return found[i]


def _describe(device: jax.Device) -> str:
    i = jax.devices(device.platform).index(device)
    if device.platform == "cpu":
        return "cpu" if i == 0 else f"cpu:{i}"
    return f"{device.platform}:{i} ({device.device_kind})"


def use_device(device: str = "auto") -> str:
    """Make ``device`` JAX's default device for what follows and name it.

    Args:
        device: "auto" (the accelerator if there is one, else the CPU), "cpu", "gpu" or "tpu",
            optionally with ":index", or a line this function returned.

    Returns:
        One line naming the device, e.g. "cpu" or "gpu:0 (NVIDIA H100 80GB HBM3)"; the
        :class:`Trainer` accepts it as its ``device``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), or "gpu"/"tpu" where
            JAX sees none.
    """
    dev = _device(device)
    jax.config.update("jax_default_device", dev)
    return _describe(dev)


def flip_bn_momentum(momentum: float) -> float:
    """Convert a BatchNorm momentum between the PyTorch and the Flax/Keras conventions.

    PyTorch updates ``running = (1 - m) * running + m * batch``: ``m`` (default 0.1) is the
    weight of the new batch. Flax (``nnx.BatchNorm``) and Keras update ``running = m' * running
    + (1 - m') * batch``: ``m'`` (default 0.99) is the weight of the old value. So
    ``m' = 1 - m`` and the conversion is its own inverse. (Beyond the momentum, PyTorch also
    feeds the unbiased batch variance into ``running_var``; see ``layers.jax.norms.BatchNorm``.)

    Args:
        momentum: the momentum in one convention.

    Returns:
        The same momentum in the other convention.
    """
    return 1.0 - momentum


# --- layout rules ---------------------------------------------------------------------------
class LeafRule(NamedTuple):
    """How one Flax leaf maps to the canonical checkpoint.

    Attributes:
        name: the canonical leaf name (``weight``, ``bias``, ``running_mean``, ...).
        perm: ``ndim -> axes`` permutation taking the Flax layout to the canonical one; None
            when the layouts are equal.
    """

    name: str
    perm: Callable[[int], tuple[int, ...]] | None = None


def _linear_perm(ndim: int) -> tuple[int, ...]:
    return (1, 0)  # (in, out) -> (out, in)


def _conv_perm(ndim: int) -> tuple[int, ...]:
    return (ndim - 1, ndim - 2, *range(ndim - 2))  # (*K, I, O) -> (O, I, *K)


NORM_RULES = {"scale": LeafRule("weight"), "bias": LeafRule("bias")}
BATCHNORM_RULES = {
    **NORM_RULES,
    "mean": LeafRule("running_mean"),
    "var": LeafRule("running_var"),
}
LAYOUT_RULES: dict[type, dict[str, LeafRule]] = {
    nnx.Linear: {"kernel": LeafRule("weight", _linear_perm), "bias": LeafRule("bias")},
    nnx.Conv: {"kernel": LeafRule("weight", _conv_perm), "bias": LeafRule("bias")},
    nnx.Embed: {"embedding": LeafRule("weight")},
    nnx.LayerNorm: NORM_RULES,
    nnx.RMSNorm: NORM_RULES,
    nnx.GroupNorm: NORM_RULES,
    nnx.BatchNorm: BATCHNORM_RULES,
}


def register_rules(module_type: type, rules: Mapping[str, LeafRule]) -> None:
    """Declare how the leaves of ``module_type`` (and its subclasses) map to canonical names."""
    LAYOUT_RULES[module_type] = dict(rules)


def _rules_for(module_type: type) -> dict[str, LeafRule] | None:
    for cls in module_type.__mro__:
        if cls in LAYOUT_RULES:
            return LAYOUT_RULES[cls]
    return None


class Frozen(nnx.Variable):
    """A frozen parameter: an NNX variable that is not an ``nnx.Param``, so it gets no gradient
    and no optimizer state, yet is exported and loaded under its canonical name like any
    parameter (LoRA's base weights). The module that owns it decides its layout rule, as for
    the ``nnx.Param`` it replaces; made by :func:`set_trainable`."""


# What a checkpoint holds: parameters, frozen or not, and BatchNorm statistics.
CHECKPOINT_KINDS = (nnx.Param, Frozen, nnx.BatchStat)


class _Leaf(NamedTuple):
    path: tuple  # NNX state path
    name: str  # canonical name
    perm: tuple[int, ...] | None
    variable: nnx.Variable


def _leaves(model: nnx.Module, kinds=CHECKPOINT_KINDS) -> list[_Leaf]:
    """Every variable of the ``kinds`` (by default: parameters, frozen ones included, and
    BatchNorm statistics) of ``model`` with its canonical name."""
    modules = dict(nnx.iter_modules(model))
    out, unmapped = [], []
    for path, var in nnx.to_flat_state(nnx.state(model, kinds)):
        # The innermost module that holds the variable decides its rule.
        depth = max(i for i in range(len(path)) if path[:i] in modules)
        owner, rel = modules[path[:depth]], path[depth:]
        rules = _rules_for(type(owner))
        if rules is not None and len(rel) == 1 and rel[0] in rules:
            rule = rules[rel[0]]
            leaf = rule.name
            perm = rule.perm(len(var.shape)) if rule.perm else None
        elif rules is None and not type(owner).__module__.startswith("flax.nnx.nn"):
            leaf, perm = ".".join(map(str, rel)), None
        else:
            unmapped.append(f"{'.'.join(map(str, path))} ({type(owner).__name__})")
            continue
        out.append(_Leaf(path, ".".join([*map(str, path[:depth]), leaf]), perm, var))
    if unmapped:
        raise ValueError(
            f"no canonical layout rule for leaves {unmapped}; declare one per module type with "
            "mlperf_tutor.frameworks.jax.register_rules"
        )
    return out


def to_canonical(model: nnx.Module) -> dict[str, np.ndarray]:
    """Parameters (frozen ones too) and BatchNorm statistics in canonical names and layouts
    (numpy copies)."""
    return {
        leaf.name: to_canonical_layout(np.asarray(leaf.variable.get_value()), leaf.perm)
        for leaf in _leaves(model)
    }


def load_canonical(model: nnx.Module, tree: Mapping[str, np.ndarray]) -> None:
    """Load a canonical tree into ``model`` in place.

    Raises:
        CheckpointMismatch: listing every missing, unexpected, misshapen or wrongly typed key;
            the model is unchanged then.
    """
    leaves = _leaves(model)
    expected = {}
    for leaf in leaves:
        value = leaf.variable.get_value()
        shape = tuple(value.shape[i] for i in leaf.perm) if leaf.perm else tuple(value.shape)
        expected[leaf.name] = (shape, np.dtype(value.dtype).name)
    check_tree(expected, tree, where="canonical tree")
    for leaf in leaves:
        leaf.variable.set_value(jnp.asarray(from_canonical_layout(tree[leaf.name], leaf.perm)))


def init_empty(make: Callable[[], M], seed: int = 0) -> M:
    """Build an NNX module without running its initialisers, ready for :func:`load_canonical`.

    Flax initialisers run eagerly, one compiled program per op and shape: seconds on a CPU for
    even the toy model, and for a large model memory and time spent on numbers that the
    checkpoint replaces anyway. Here the module is traced abstractly (``nnx.eval_shape``) and
    its parameters and statistics are allocated as zeros; RNG streams get keys split from
    ``seed`` and counters start at 0.

    Args:
        make: builds the module, e.g. ``lambda: ToyModel(cfg, rngs=nnx.Rngs(0))``.
        seed: seed of the RNG streams' keys (dropout), if the module holds any.
    """
    model = nnx.eval_shape(make)
    variables = [var for _, var in nnx.to_flat_state(nnx.state(model))]
    is_key = [jax.dtypes.issubdtype(v.get_value().dtype, jax.dtypes.prng_key) for v in variables]
    keys = iter(jax.random.split(jax.random.key(seed), sum(is_key)) if any(is_key) else [])
    for var, key in zip(variables, is_key, strict=True):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if key:
            var.set_value(jnp.broadcast_to(next(keys), shape))
        else:  # numpy, then one transfer: no compiled program per shape
            var.set_value(jnp.asarray(np.zeros(shape, dtype)))
    return model


def trainable_names(model: nnx.Module) -> list[str]:
    """Canonical names of the trainable parameters (``nnx.Param``; not :class:`Frozen`)."""
    return [leaf.name for leaf in _leaves(model, nnx.Param)]


def set_trainable(model: nnx.Module, trainable: Callable[[str], bool]) -> None:
    """Train only the parameters whose canonical name ``trainable`` accepts; the others are
    frozen: no gradient, no optimizer state (LoRA's base weights).

    Each parameter the predicate refuses is replaced, on the module that holds it, by a
    :class:`Frozen` variable with the same value and metadata; a frozen one it accepts becomes
    an ``nnx.Param`` again. Values, canonical names and checkpoints are unchanged. Call it
    before :func:`make_optimizer`: an optimizer covers the parameters trainable when it is made.
    """
    for leaf in _leaves(model, (nnx.Param, Frozen)):
        var = leaf.variable
        if bool(trainable(leaf.name)) == isinstance(var, nnx.Param):
            continue  # already as asked (a subclass of nnx.Param stays what it is)
        kind = Frozen if isinstance(var, nnx.Param) else nnx.Param
        _replace_variable(model, leaf.path, kind(var.get_value(), **var.get_metadata()))


def _replace_variable(model: nnx.Module, path: tuple, new: nnx.Variable) -> None:
    # Integer keys index nnx.List (blocks.0...), string keys are attributes.
    node = model
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    if isinstance(path[-1], int):
        node[path[-1]] = new
    else:
        setattr(node, path[-1], new)


def _grads_to_canonical(model: nnx.Module, grads: nnx.State) -> dict[str, np.ndarray]:
    by_path = {leaf.path: leaf for leaf in _leaves(model, nnx.Param)}
    return {
        by_path[path].name: to_canonical_layout(to_numpy(g), by_path[path].perm)
        for path, g in nnx.to_flat_state(grads)
    }


# --- models ---------------------------------------------------------------------------------
def _mode(model: nnx.Module, train: bool) -> nnx.Module:
    """A view of ``model`` in train or eval mode, sharing its variables (as ``model.train()``
    would set, without changing the mode of ``model`` itself)."""
    return nnx.with_attributes(
        model, deterministic=not train, use_running_average=not train, raise_if_not_found=False
    )


def _batch(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


@nnx.jit
def _forward(model, batch):
    return model(batch)


@nnx.jit
def _loss_and_grads(model, batch):
    return nnx.value_and_grad(lambda m: m(batch)["loss"])(model)


def forward(
    model: nnx.Module,
    batch: Mapping[str, np.ndarray],
    train: bool = False,
    outputs: tuple[str, ...] | None = None,
) -> dict:
    """Named outputs (numpy) of ``model`` on a numpy batch; train mode updates BatchNorm stats.
    ``outputs`` names the ones copied to the host (None: all); the others stay on the device."""
    check_model_batch(model, batch)
    out = _forward(_mode(model, train), _batch(batch))
    return {k: to_numpy(v) for k, v in out.items() if outputs is None or k in outputs}


def loss_and_grads(
    model: nnx.Module, batch: Mapping[str, np.ndarray], train: bool = True
) -> tuple[float, dict[str, np.ndarray]]:
    """The loss and its gradients in canonical names and layouts (train mode updates BN stats)."""
    check_model_batch(model, batch)
    loss, grads = _loss_and_grads(_mode(model, train), _batch(batch))
    return float(loss), _grads_to_canonical(model, grads)


# --- optimizers -----------------------------------------------------------------------------
class Optimizer(OptaxState):
    """The optimizer of one model's trainable parameters; use it with :func:`train_step`.

    The optax transformation (``.native``) works on a flat dict keyed by canonical name, so its
    state maps one-to-one to the canonical state (slots are transposed like their parameter).

    Args:
        spec: the optimizer.
        schedule: the learning-rate schedule.
        model: the NNX model whose ``nnx.Param`` leaves are trained.
    """

    def __init__(self, spec: OptimizerSpec, schedule: ScheduleSpec, model: nnx.Module):
        leaves = _leaves(model, nnx.Param)
        params = {leaf.name: leaf.variable.get_value() for leaf in leaves}
        paths = tuple((leaf.name, leaf.path) for leaf in leaves)
        native, self._step, self._traces = _compiled_step(spec, schedule, paths)
        perms = {leaf.name: leaf.perm for leaf in leaves}
        super().__init__(spec, schedule, params, perms, native=native)
        self._model = weakref.ref(model)

    @property
    def trace_count(self) -> int:
        """How often the jitted step was traced, counted over every optimizer that shares it."""
        return self._traces[0]


@functools.lru_cache(maxsize=64)
def _compiled_step(spec: OptimizerSpec, schedule: ScheduleSpec, paths: tuple):
    """(transformation, jitted step, trace counter), shared by optimizers of one spec and
    structure: a new optimizer for the same model (e.g. after a restart) does not recompile."""
    tx = make_transformation(spec, schedule, [name for name, _ in paths])
    traces = [0]
    return tx, _make_train_step(tx, dict(paths), traces), traces


def _make_train_step(
    tx: optax.GradientTransformation, paths: Mapping[str, tuple], traces: list[int]
):
    """One jitted update, traced once per model structure, mode and batch shapes."""

    @nnx.jit
    def step(model, opt_state, batch):
        traces[0] += 1  # Python side effect: runs only while tracing
        loss, grads = nnx.value_and_grad(lambda m: m(batch)["loss"])(model)
        g = dict(nnx.to_flat_state(grads))
        variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        params = {name: variables[path].get_value() for name, path in paths.items()}
        grads_flat = {name: g[path].get_value() for name, path in paths.items()}
        updates, opt_state = tx.update(grads_flat, opt_state, params)
        for name, value in optax.apply_updates(params, updates).items():
            variables[paths[name]].set_value(value)
        return loss, opt_state

    return step


def make_optimizer(spec: OptimizerSpec, schedule: ScheduleSpec, model: nnx.Module) -> Optimizer:
    """An :class:`Optimizer` over the trainable parameters of ``model``."""
    return Optimizer(spec, schedule, model)


def train_step(model: nnx.Module, optimizer: Optimizer, batch: Mapping[str, np.ndarray]) -> float:
    """One update of ``model`` in place (train mode); returns the loss before the update."""
    if optimizer._model() is not model:
        raise ValueError(
            "this optimizer was made for a different model; call make_optimizer(spec, schedule, "
            "model) for this one"
        )
    check_model_batch(model, batch)
    loss, optimizer.opt_state = optimizer._step(
        _mode(model, True), optimizer.opt_state, _batch(batch)
    )
    return float(loss)


# --- training -------------------------------------------------------------------------------
PRECISIONS = ("fp32", "bf16")
CHECKPOINT_FOLDER = "state"  # the Orbax checkpoint inside the directory Trainer.save is given


class _Flat(NamedTuple):
    """The variables of one ``nnx.State``, flattened: NNX paths, variables and values in one
    order, and the treedef that rebuilds the state from values in that order."""

    paths: tuple[tuple, ...]
    variables: list[nnx.Variable]
    values: list[jax.Array]
    treedef: Any


def _flatten(state: nnx.State) -> _Flat:
    flat = list(nnx.to_flat_state(state))
    values, treedef = jax.tree.flatten(state)
    # One leaf per variable, in to_flat_state's order: the names of the leaves rely on it.
    same = len(values) == len(flat) and all(
        a is v.get_value() for a, (_, v) in zip(values, flat, strict=True)
    )
    if not same:
        raise RuntimeError("nnx.State does not flatten to one leaf per variable (flax changed?)")
    return _Flat(tuple(p for p, _ in flat), [v for _, v in flat], values, treedef)


def _split(model: nnx.Module) -> tuple[Any, _Flat, _Flat, _Flat]:
    """(graphdef, trainable parameters, frozen ones, the rest: RNG streams, BatchNorm stats)."""
    graphdef, params, frozen, rest = nnx.split(model, nnx.Param, Frozen, ...)
    return graphdef, _flatten(params), _flatten(frozen), _flatten(rest)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _owned(tree, placement):
    """Copies of every leaf of ``tree`` placed by ``placement`` (a device or sharding, or a tree
    of them matching ``tree``): buffers that no other array shares, so that donating them
    deletes nothing else (optax's init and ``OptaxState.load_state_dict`` may hand one array to
    several slots, or a slot the parameter's own buffer)."""
    return jax.device_put(tree, placement, may_alias=False)


def _like_params(opt_state, params: Mapping[str, Any], other):
    """A tree of ``opt_state``'s structure holding, for each leaf, ``params[name]`` where the
    leaf belongs to parameter ``name`` (optax keeps a slot of the flat parameter dict under its
    name, e.g. ``mu[name]``) and ``other`` elsewhere (step counts)."""

    def pick(path, _):
        for key in path:
            if isinstance(key, jax.tree_util.DictKey) and key.key in params:
                return params[key.key]
        return other

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def _leaf_name(path) -> str:
    """A pytree key path as Orbax names it: keys and indices joined with dots."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey | jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k.name))
    return ".".join(parts)


def _named_specs(tree) -> dict[str, Any]:
    """Dotted name -> leaf (anything with ``shape`` and ``dtype``) of a nested tree."""
    return {_leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.lru_cache(maxsize=64)
def _compiled_update(
    graphdef,
    treedefs: tuple,
    names: tuple[str, ...],
    spec: OptimizerSpec,
    schedule: ScheduleSpec,
    precision: str,
):
    """(optax transformation, jitted update) of :class:`Trainer` on one device, shared by
    trainers of one model structure, optimizer and precision (a trainer made again does not
    recompile).

    The float32 masters, the optimizer state and the RNG/BatchNorm state are donated: updated
    in place, no second copy alive."""
    tx, update = _update_function(graphdef, treedefs, names, spec, schedule, precision)
    return tx, jax.jit(update, donate_argnums=DONATED)


DONATED = (0, 1, 2)  # the update's params, optimizer state and rest: updated in place


@functools.lru_cache(maxsize=64)
def _update_function(
    graphdef,
    treedefs: tuple,
    names: tuple[str, ...],
    spec: OptimizerSpec,
    schedule: ScheduleSpec,
    precision: str,
):
    """(optax transformation, update function, not compiled) of :class:`Trainer`:
    ``update(params, opt_state, rest, frozen, batch) -> (params, opt_state, rest, loss)``.

    ``names`` are the canonical names of the trainable leaves in the order of their treedef."""
    tx = make_transformation(spec, schedule, names)
    params_def, frozen_def, rest_def = treedefs
    low = jnp.bfloat16 if precision == "bf16" else None

    def loss_fn(params, frozen, rest, batch):
        values = [params[name] for name in names]
        if low is not None:  # bf16 copies of the float32 masters, made inside the step
            values = [v.astype(low) if v.dtype == jnp.float32 else v for v in values]
        model = nnx.merge(
            graphdef,
            params_def.unflatten(values),
            frozen_def.unflatten(frozen),
            rest_def.unflatten(rest),
        )
        loss = model(batch)["loss"].astype(jnp.float32)
        _, _, _, new_rest = nnx.split(model, nnx.Param, Frozen, ...)  # RNG counts, BN stats
        return loss, jax.tree.leaves(new_rest)

    def update(params, opt_state, rest, frozen, batch):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rest, loss

    return tx, update


class Trainer:
    """Trains one NNX model: placement, precision, the compiled update, RNG streams and Orbax
    checkpoints (the contract of ``mlperf_tutor.frameworks``).

    The model is split once (``nnx.split``) into its trainable parameters, its frozen ones and
    the rest (RNG streams of dropout, BatchNorm statistics). The trainer keeps them as arrays,
    with the optax state, and runs one ``jax.jit`` update on them that donates the parameters,
    the optimizer state and the rest and returns them updated: no ``nnx.merge`` or
    ``nnx.update`` of the model per step, no host sync. The model gets the arrays back when
    :attr:`model` is read.

    Precision "bf16": the trainable parameters stay float32 masters (and so does the optimizer
    state); the step computes with bf16 copies of them made inside the jitted update. Frozen
    parameters (LoRA's base) are stored in bf16 once, in the trainer and in the model. Losses,
    softmax and normalisation statistics are float32 (the models compute them so; the step
    casts the loss). BatchNorm statistics stay float32.

    Sharded (``plan``): the trainer realises a :class:`mlperf_tutor.parallel.Plan` on a
    ``jax.sharding.Mesh`` (see :mod:`mlperf_tutor.parallel.jax`). Parameters, frozen ones and
    BatchNorm statistics are placed with the plan's ``NamedSharding`` (in the JAX layout), each
    optimizer slot like its parameter, RNG streams and counters replicated, and each batch split
    over ``data`` × ``fsdp``. The update is the same function, compiled with these input and
    output shardings (still donating its state): XLA's partitioner adds the communication.
    :meth:`weights` and :meth:`optimizer_state` gather canonical numpy arrays; :meth:`save`
    writes the sharded arrays with Orbax and :meth:`restore` reads a checkpoint of any mesh onto
    this trainer's shardings.

    Args:
        model: an NNX workload model (``wl.build("jax", cfg, weights=...)``), float32.
        spec: the optimizer.
        schedule: the learning-rate schedule.
        precision: "fp32" or "bf16".
        device: a name :func:`use_device` accepts, or what it returned.
        seed: seeds every RNG stream of the model (dropout), keys split from
            ``jax.random.key(seed)`` as :func:`init_empty` splits them and counters at 0.
        plan: train sharded as this plan of the model's workload says (None: on ``device``,
            which a plan overrides).
        mesh: the ``jax.sharding.Mesh`` for ``plan`` (None: ``device_mesh(plan.mesh)``, the
            first devices of the default backend).

    Raises:
        ValueError: an unknown precision or device; a plan whose mesh needs more devices than
            there are, or whose parameters are not the model's
            (``mlperf_tutor.parallel.ParallelError``).
    """

    def __init__(
        self,
        model: nnx.Module,
        spec: OptimizerSpec,
        schedule: ScheduleSpec,
        *,
        precision: str = "fp32",
        device: str = "cpu",
        seed: int = 0,
        plan=None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
        self.precision = precision
        self.device = _device(device)
        self._model = model
        leaves = _leaves(model)
        self._declared = {}  # canonical name -> (shape, dtype) as built: what weights() gives
        for leaf in leaves:
            shape = tuple(leaf.variable.get_value().shape)
            shape = tuple(shape[i] for i in leaf.perm) if leaf.perm else shape
            self._declared[leaf.name] = (shape, np.dtype(leaf.variable.get_value().dtype).name)
        self._frozen_names = {leaf.name for leaf in leaves if isinstance(leaf.variable, Frozen)}
        trainable = [leaf for leaf in leaves if isinstance(leaf.variable, nnx.Param)]

        graphdef, params, frozen, rest = _split(_mode(model, True))
        name_of = {leaf.path: leaf.name for leaf in trainable}
        self._names = tuple(name_of[path] for path in params.paths)  # treedef order
        self._treedefs = (params.treedef, frozen.treedef, rest.treedef)
        self._paths = (params.paths, frozen.paths, rest.paths)
        self._frozen_keys = [".".join(map(str, p)) for p in frozen.paths]
        self._rest_keys = [".".join(map(str, p)) for p in rest.paths]

        self._place(model, leaves, plan, mesh)
        by_name = dict(zip(self._names, params.values, strict=True))
        # In _leaves order, as Optimizer has them: the canonical state's key order.
        self._params = _owned(
            {leaf.name: by_name[leaf.name] for leaf in trainable}, self._param_shardings
        )
        self._frozen = _owned([self._stored(v) for v in frozen.values], self._frozen_shardings)
        self._rest = _owned(self._seeded(rest, seed), self._rest_shardings)
        perms = {leaf.name: leaf.perm for leaf in trainable}
        if plan is None:
            tx, self._update = _compiled_update(
                graphdef, self._treedefs, self._names, spec, schedule, precision
            )
            self._opt = OptaxState(spec, schedule, self._params, perms, native=tx)
            self._opt_shardings = self._replicated
        else:  # compiled per trainer: the shardings are part of the program
            tx, update = _update_function(
                graphdef, self._treedefs, self._names, spec, schedule, precision
            )
            self._opt = OptaxState(spec, schedule, self._params, perms, native=tx)
            self._opt_shardings = _like_params(
                self._opt.opt_state, self._param_shardings, self._replicated
            )
            state = (self._param_shardings, self._opt_shardings, self._rest_shardings)
            self._update = jax.jit(
                update,
                in_shardings=(*state, self._frozen_shardings, self._batch_sharding),
                out_shardings=(*state, self._replicated),
                donate_argnums=DONATED,
            )
        self._opt.opt_state = _owned(self._opt.opt_state, self._opt_shardings)
        self._steps = 0
        self._write_back()  # the model holds the trainer's arrays (frozen ones in bf16)

    def _place(self, model: nnx.Module, leaves: list[_Leaf], plan, mesh) -> None:
        """Decide where every array lives: on :attr:`device`, or (``plan``) with the plan's
        shardings on ``mesh``: parameters, frozen ones and BatchNorm statistics as the plan
        splits them, RNG streams replicated, batches split over ``data`` × ``fsdp``."""
        self.plan = plan
        if plan is None and mesh is not None:
            raise ValueError("a mesh without a plan: pass plan= (mlperf_tutor.parallel.plan)")
        if plan is None:
            self.mesh = None
            one = jax.sharding.SingleDeviceSharding(self.device)
            self._replicated = self._batch_sharding = one
            by_name = {}
        else:  # imported here: mlperf_tutor.parallel.jax imports this module
            from mlperf_tutor.parallel import jax as pj

            self.mesh = pj.device_mesh(plan.mesh) if mesh is None else mesh
            by_name = pj.shardings(plan, self.mesh, model)
            self._replicated = pj.replicated(self.mesh)
            self._batch_sharding = pj.batch_sharding(self.mesh)
        where = {leaf.path: by_name.get(leaf.name, self._replicated) for leaf in leaves}
        self._param_shardings = {  # keyed and ordered as the parameters' dict
            leaf.name: where[leaf.path] for leaf in leaves if isinstance(leaf.variable, nnx.Param)
        }
        _, frozen_paths, rest_paths = self._paths
        self._frozen_shardings = [where[path] for path in frozen_paths]
        self._rest_shardings = [where.get(path, self._replicated) for path in rest_paths]

    def _stored(self, value: jax.Array) -> jax.Array:
        """A frozen parameter as the trainer stores it: bf16 under "bf16"."""
        if self.precision == "bf16" and value.dtype == jnp.float32:
            return value.astype(jnp.bfloat16)
        return value

    @staticmethod
    def _seeded(rest: _Flat, seed: int) -> list[jax.Array]:
        """The rest's values with every RNG stream reseeded: keys split from
        ``jax.random.key(seed)`` in path order (as :func:`init_empty`), counters 0."""
        n_keys = sum(_is_key(v) for v in rest.values)
        keys = iter(jax.random.split(jax.random.key(seed), n_keys) if n_keys else [])
        out = []
        for var, value in zip(rest.variables, rest.values, strict=True):
            if _is_key(value):
                value = jnp.broadcast_to(next(keys), value.shape)
            elif isinstance(var, nnx.RngCount):
                value = jnp.zeros_like(value)
            out.append(value)
        return out

    def _write_back(self) -> None:
        params_def, frozen_def, rest_def = self._treedefs
        nnx.update(
            self._model,
            params_def.unflatten([self._params[name] for name in self._names]),
            frozen_def.unflatten(self._frozen),
            rest_def.unflatten(self._rest),
        )
        self._dirty = False

    def step(self, batch: Mapping[str, np.ndarray]) -> jax.Array:
        """One update in train mode (dropout on, BatchNorm statistics updated).

        Returns:
            The loss before the update, a float32 device array (not synchronised).
        """
        check_model_batch(self._model, batch)
        if self.plan is not None:
            shards = self.plan.mesh.batch_shards
            uneven = {
                k: np.shape(v) for k, v in batch.items() if np.ndim(v) == 0 or len(v) % shards
            }
            if uneven:
                raise ValueError(
                    f"mesh {self.plan.mesh} splits the batch into {shards} (data x fsdp), but "
                    f"these batch arrays' first dimensions are not multiples of it: {uneven}; "
                    f"use a batch size divisible by {shards}"
                )
        arrays = jax.device_put(dict(batch), self._batch_sharding)
        self._params, self._opt.opt_state, self._rest, loss = self._update(
            self._params, self._opt.opt_state, self._rest, self._frozen, arrays
        )
        self._steps += 1
        self._dirty = True
        return loss

    def evaluating(self) -> contextlib.AbstractContextManager:
        """A context for forwards outside :meth:`step` (evaluation); nothing to set in JAX (a
        bf16 model's frozen bf16 weights meet float32 activations by promotion)."""
        return contextlib.nullcontext()

    def loss_value(self, handle: jax.Array) -> float:
        """The float of a loss :meth:`step` returned (waits for that step)."""
        return float(handle)

    @property
    def model(self) -> nnx.Module:
        """The model with the trainer's current arrays, written back on access.

        The model shares the arrays until the next :meth:`step`, which donates (deletes) them:
        read ``trainer.model`` again after stepping rather than keeping it. Under "bf16" its
        frozen parameters are bf16. Change weights with :meth:`load_state`: what is written
        into the model directly does not reach the trainer.
        """
        if self._dirty:
            self._write_back()
        return self._model

    @property
    def steps(self) -> int:
        """Updates applied so far (the learning-rate schedule's position)."""
        return self._steps

    def weights(self) -> dict[str, np.ndarray]:
        """Canonical weights (numpy): the float32 masters, BatchNorm statistics, and frozen
        parameters in their declared dtype (under "bf16" their stored bf16 values, widened
        back to float32 exactly)."""
        tree = to_canonical(self.model)
        return {k: v.astype(self._declared[k][1], copy=False) for k, v in tree.items()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The canonical optimizer state (``"step"`` and the slots; see ``core.optim``)."""
        return self._opt.state_dict()

    def load_state(
        self, weights: Mapping[str, np.ndarray], optimizer_state: Mapping | None = None
    ) -> None:
        """Load canonical weights and, if given, a canonical optimizer state (from any
        framework). Without one the optimizer starts afresh (step 0).

        Raises:
            CheckpointMismatch: (a ValueError) listing every missing, unexpected, misshapen or
                wrongly typed key of either; nothing is changed then.
        """
        check_tree(self._declared, weights, where="canonical tree")
        model = self.model  # the model holds the current RNG and BatchNorm state
        if optimizer_state is not None:
            self._opt.load_state_dict(optimizer_state)  # checks before it replaces
        tree = dict(weights)
        if self.precision == "bf16":
            for name in self._frozen_names:
                tree[name] = np.asarray(tree[name]).astype(jnp.bfloat16)
        load_canonical(model, tree)
        _, params, frozen, rest = _split(model)
        # The rest as the model now holds it: its RNG streams and the loaded BatchNorm stats.
        self._rest = _owned(rest.values, self._rest_shardings)
        if (params.paths, frozen.paths) != self._paths[:2]:
            raise RuntimeError("the model's structure changed since the trainer was made")
        by_name = dict(zip(self._names, params.values, strict=True))
        self._params = _owned({name: by_name[name] for name in self._params}, self._param_shardings)
        self._frozen = _owned(frozen.values, self._frozen_shardings)
        if optimizer_state is None:
            self._opt.opt_state = self._opt.native.init(self._params)
        self._opt.opt_state = _owned(self._opt.opt_state, self._opt_shardings)
        self._steps = 0 if optimizer_state is None else int(np.asarray(optimizer_state["step"]))
        self._write_back()

    def _checkpoint_tree(self) -> dict[str, Any]:
        """Everything :meth:`save` writes, PRNG keys as their ``key_data``."""
        return {
            "params": self._params,
            "frozen": dict(zip(self._frozen_keys, self._frozen, strict=True)),
            "rest": {
                k: jax.random.key_data(v) if _is_key(v) else v
                for k, v in zip(self._rest_keys, self._rest, strict=True)
            },
            "opt_state": self._opt.opt_state,
            "steps": np.asarray(self._steps, dtype=np.int64),
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write the training state into ``directory`` (existing, empty) as an Orbax checkpoint
        (in its folder ``state``): float32 masters, frozen parameters as stored, BatchNorm
        statistics, every RNG stream's key and counter, the optax state and the step count.
        A sharded trainer's arrays are written as they lie, each device its slices. Returns
        once the checkpoint is complete."""
        import orbax.checkpoint as ocp

        path = Path(directory).absolute() / CHECKPOINT_FOLDER  # Orbax refuses relative paths
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, self._checkpoint_tree())
            ckptr.wait_until_finished()

    def restore(self, directory: str | os.PathLike) -> None:
        """Read back what :meth:`save` wrote (a trainer of the same model, precision and
        optimizer); then :meth:`step` continues the saved run bit for bit.

        The checkpoint may come from another mesh or from one device: every array is read onto
        this trainer's own placement (its plan's shardings, or its device).

        Raises:
            ValueError: no checkpoint, an unreadable one, or one whose arrays differ from this
                trainer's (every mismatching name listed); the message names ``directory``,
                and the trainer is unchanged.
        """
        import orbax.checkpoint as ocp

        path = Path(directory).absolute() / CHECKPOINT_FOLDER
        if not path.is_dir():
            raise ValueError(
                f"{directory} holds no JAX trainer checkpoint (no folder {CHECKPOINT_FOLDER!r} "
                "in it); pass a directory that Trainer.save wrote"
            )
        template = self._checkpoint_tree()
        try:
            with ocp.StandardCheckpointer() as ckptr:
                meta = ckptr.metadata(path).item_metadata
                tree = getattr(meta, "tree", None)
                if tree is None:  # Orbax logs why and returns no metadata instead of raising
                    raise ValueError("its metadata cannot be read")
                check_tree(
                    {k: spec_of(v) for k, v in _named_specs(template).items()},
                    _named_specs(tree),
                    where=f"the trainer checkpoint {directory}",
                    hint="restore it into a trainer of the same workload, preset, precision "
                    "and optimizer",
                )
                # Onto this trainer's own placement, whatever mesh wrote the checkpoint: Orbax
                # reads each device's slice of the target sharding.
                abstract = jax.tree.map(
                    lambda x: (
                        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                        if isinstance(x, jax.Array)
                        else x
                    ),
                    template,
                )
                restored = ckptr.restore(path, abstract)
        except CheckpointMismatch:
            raise
        except Exception as e:  # orbax, tensorstore and json raise many unrelated types
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ValueError(
                f"{directory} is not a readable JAX trainer checkpoint ({type(e).__name__}: "
                f"{first}); it is incomplete or corrupt, save it again"
            ) from e
        rest = [restored["rest"][k] for k in self._rest_keys]
        self._rest = [
            jax.random.wrap_key_data(r, impl=jax.random.key_impl(old)) if _is_key(old) else r
            for r, old in zip(rest, self._rest, strict=True)
        ]
        self._params = {name: restored["params"][name] for name in self._params}
        self._frozen = [restored["frozen"][k] for k in self._frozen_keys]
        self._opt.opt_state = restored["opt_state"]
        self._steps = int(restored["steps"])
        self._dirty = True

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

import functools
import random
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mlperf_tutor.core.checkpoint import check_tree
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


def forward(model: nnx.Module, batch: Mapping[str, np.ndarray], train: bool = False) -> dict:
    """Named outputs (numpy) of ``model`` on a numpy batch; train mode updates BatchNorm stats."""
    out = _forward(_mode(model, train), _batch(batch))
    return {k: to_numpy(v) for k, v in out.items()}


def loss_and_grads(
    model: nnx.Module, batch: Mapping[str, np.ndarray], train: bool = True
) -> tuple[float, dict[str, np.ndarray]]:
    """The loss and its gradients in canonical names and layouts (train mode updates BN stats)."""
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
    loss, optimizer.opt_state = optimizer._step(
        _mode(model, True), optimizer.opt_state, _batch(batch)
    )
    return float(loss)

"""TensorFlow adapter (Keras 3 on the TensorFlow backend): the contract of ``frameworks/__init__``.

Importing this module imports TensorFlow and Keras, so it first sets the environment they read at
import time (only where the user has not set it):

* ``KERAS_BACKEND=tensorflow``: Keras 3 picks its backend once, at its first import.
* ``TF_CPP_MIN_LOG_LEVEL=2``: hides TensorFlow's C++ info and warning lines in notebooks (not
  the one "oneDNN custom operations are on" line, which TF 2.21 prints before its log level is
  read).

``TF_ENABLE_ONEDNN_OPTS`` is left alone on purpose: oneDNN's float32 kernels differ from Eigen's
only in summation order, so parity does not need them off. Measured against PyTorch on the toy
workload, oneDNN on and off give the same errors: logits max-abs 2e-7 (tiny) and 3e-6 (small,
batch 16), gradients relative 5e-7 and 1.5e-6. Turning it off would slow CPU users down for no
parity gain.

Canonical names come from the attribute path of each layer inside the model (``model.fc1`` ->
``fc1.``, ``model.blocks[3].attn`` -> ``blocks.3.attn.``), never from Keras variable paths, which
depend on the name scopes active when a layer was built. Leaf names and layouts follow the rule
table :data:`LEAF_RULES`, keyed by layer type; a custom layer declares its own leaves with a
``canonical_leaves`` class attribute (see ``layers/tf/norms.py``'s ``BatchNorm``).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

if "keras" in sys.modules:
    _backend = sys.modules["keras"].backend.backend()
    if _backend != "tensorflow":
        raise ImportError(
            f"keras was already imported with the {_backend!r} backend; set the environment "
            "variable KERAS_BACKEND=tensorflow before anything imports keras (or restart the "
            "Python session) to use the 'tf' framework"
        )

import dataclasses  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mlperf_tutor.core.checkpoint import CheckpointMismatch, Tree, check_tree  # noqa: E402
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec  # noqa: E402
from mlperf_tutor.frameworks import tf_optim  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"keras is configured for the {keras.backend.backend()!r} backend (KERAS_BACKEND or "
        "~/.keras/keras.json); set KERAS_BACKEND=tensorflow before starting Python to use the "
        "'tf' framework"
    )

NAME = "tf"


# --- arrays, seeding, precision, devices ------------------------------------------------------
def to_numpy(x) -> np.ndarray:
    """A numpy copy of a tensor, Keras variable or array; bfloat16 stays ``ml_dtypes.bfloat16``."""
    if isinstance(x, tf.IndexedSlices):  # Embedding gradients arrive as sparse slices.
        x = tf.convert_to_tensor(x)
    if hasattr(x, "numpy"):
        return np.asarray(x.numpy())
    return np.asarray(x)


def from_numpy(a, dtype=None) -> tf.Tensor:
    """A ``tf.Tensor`` from an array-like, optionally cast to ``dtype`` (numpy or TF dtype)."""
    t = tf.convert_to_tensor(np.asarray(a))
    return t if dtype is None else tf.cast(t, tf.as_dtype(dtype))


def seed(n: int) -> None:
    """Seed Python's ``random``, numpy, TensorFlow and Keras' global generators."""
    keras.utils.set_random_seed(n)


def pin_precision() -> None:
    """Full float32 matmuls and convolutions (TF32 off; matters on Ampere and newer GPUs)."""
    tf.config.experimental.enable_tensor_float_32_execution(False)


def devices() -> list[str]:
    """Names of TensorFlow's logical devices, e.g. ``["/device:CPU:0", "/device:GPU:0"]``."""
    return [d.name for d in tf.config.list_logical_devices()]


def device_summary() -> str:
    """One line: versions and the accelerators TensorFlow sees."""
    parts = []
    for kind in ("TPU", "GPU"):
        found = tf.config.list_logical_devices(kind)
        if found:
            label = kind
            if kind == "GPU":
                physical = tf.config.list_physical_devices("GPU")
                details = tf.config.experimental.get_device_details(physical[0]) if physical else {}
                label = details.get("device_name", "GPU")
            parts.append(f"{len(found)} x {label}")
    parts.append(f"{len(tf.config.list_logical_devices('CPU'))} x CPU")
    return f"TensorFlow {tf.__version__} (Keras {keras.__version__}): {', '.join(parts)}"


# --- layout rules -----------------------------------------------------------------------------
IDENTITY = "identity"
# Keras kernels put the output axis last and the spatial axes first: Dense (in, out), Conv2D
# (H, W, in, out). PyTorch puts output first: (out, in, *spatial). One permutation covers both.
KERNEL = "kernel"

_KERNEL_LEAVES = {"kernel": ("weight", KERNEL), "bias": ("bias", IDENTITY)}
_NORM_LEAVES = {"gamma": ("weight", IDENTITY), "beta": ("bias", IDENTITY)}

#: Layer type -> {Keras leaf name: (canonical leaf name, layout)}. Looked up along the MRO.
LEAF_RULES: dict[type, dict[str, tuple[str, str]]] = {
    keras.layers.Dense: _KERNEL_LEAVES,
    keras.layers.Conv1D: _KERNEL_LEAVES,
    keras.layers.Conv2D: _KERNEL_LEAVES,
    keras.layers.Conv3D: _KERNEL_LEAVES,
    keras.layers.Embedding: {"embeddings": ("weight", IDENTITY)},
    keras.layers.LayerNormalization: _NORM_LEAVES,
    keras.layers.GroupNormalization: _NORM_LEAVES,
    keras.layers.RMSNormalization: {"scale": ("weight", IDENTITY)},
    keras.layers.BatchNormalization: {
        **_NORM_LEAVES,
        "moving_mean": ("running_mean", IDENTITY),
        "moving_variance": ("running_var", IDENTITY),
    },
}


def _to_canonical_array(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == KERNEL:
        n = a.ndim
        return np.ascontiguousarray(np.transpose(a, (n - 1, n - 2, *range(n - 2))))
    return a


def _from_canonical_array(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == KERNEL:
        n = a.ndim
        return np.ascontiguousarray(np.transpose(a, (*range(2, n), 1, 0)))
    return a


def _canonical_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == KERNEL:
        return (shape[-1], shape[-2], *shape[:-2])
    return tuple(shape)


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare variables elementwise
class Leaf:
    """One model variable with its canonical name and layout.

    Attributes:
        name: canonical name, e.g. ``fc1.weight``.
        variable: the Keras variable.
        layout: ``IDENTITY`` or ``KERNEL``.
    """

    name: str
    variable: keras.Variable
    layout: str

    @property
    def spec(self) -> tuple[tuple[int, ...], str]:
        """(canonical shape, dtype name), as :func:`core.checkpoint.tree_specs` gives it."""
        shape = tuple(int(d) for d in self.variable.shape)
        return _canonical_shape(shape, self.layout), np.dtype(self.variable.dtype).name

    def to_canonical(self, value) -> np.ndarray:
        """A value in this variable's Keras layout (tensor or array) in canonical layout."""
        return _to_canonical_array(to_numpy(value), self.layout)

    def from_canonical(self, value: np.ndarray) -> np.ndarray:
        """A canonical-layout array in this variable's Keras layout."""
        return _from_canonical_array(np.asarray(value), self.layout)


def _leaf_rules(layer: keras.layers.Layer) -> dict[str, tuple[str, str]] | None:
    custom = getattr(type(layer), "canonical_leaves", None)
    if custom is not None:
        return {k: (v, IDENTITY) if isinstance(v, str) else tuple(v) for k, v in custom.items()}
    for cls in type(layer).__mro__:
        if cls in LEAF_RULES:
            return LEAF_RULES[cls]
    return None


def _children(value, path: str):
    """(attribute path, layer) pairs directly under ``value``; lists give digit indices."""
    if isinstance(value, keras.layers.Layer):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _children(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _children(item, f"{path}.{i}")


def _walk(model: keras.layers.Layer):
    """(path prefix, layer, its direct sublayers as (path, layer)) of every layer under
    ``model``, the model first (prefix ""), depth first in attribute order; a layer reached
    twice is visited once, at its first path."""
    seen = {id(model)}

    def visit(layer, prefix: str):
        children = []
        for attr, value in vars(layer).items():
            if not attr.startswith("_"):
                children += [(p, c) for p, c in _children(value, prefix + attr)]
        yield prefix, layer, children
        for path, child in children:
            if id(child) not in seen:
                seen.add(id(child))
                yield from visit(child, path + ".")

    yield from visit(model, "")


def leaves(model: keras.layers.Layer) -> list[Leaf]:
    """Every variable of ``model`` (parameters and buffers) with its canonical name and layout.

    Sublayers are found through public attributes, in assignment order; a layer reached twice
    (weight tying) is named once, at its first path.

    Raises:
        ValueError: the model is not built, a built-in Keras layer holds a variable without a
            rule in :data:`LEAF_RULES`, or two variables get the same canonical name.
    """
    if not model.built:
        raise ValueError(
            f"model {model.name!r} is not built; create it with its workload's build(cfg), which "
            "creates every variable, before exporting or loading weights"
        )
    out: list[Leaf] = []
    for prefix, layer, children in _walk(model):
        inner = {id(v) for _, child in children for v in child.weights}
        rules = _leaf_rules(layer)
        for var in layer.weights:
            if id(var) in inner:
                continue
            if rules is not None and var.name in rules:
                leaf_name, layout = rules[var.name]
            elif rules is None and not type(layer).__module__.startswith("keras"):
                leaf_name, layout = var.name, IDENTITY  # custom layers keep their own names
            else:
                raise ValueError(
                    f"variable {var.name!r} of layer {prefix.rstrip('.') or model.name!r} "
                    f"({type(layer).__name__}) has no layout rule; add one to "
                    "mlperf_tutor.frameworks.tf.LEAF_RULES or a canonical_leaves class attribute"
                )
            out.append(Leaf(prefix + leaf_name, var, layout))
    names = [leaf.name for leaf in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"canonical names {dupes} are used twice; rename the layer attributes")
    return out


def to_canonical(model: keras.layers.Layer) -> Tree:
    """Parameters and buffers in canonical (PyTorch ``state_dict``) names, layouts and dtypes."""
    return {leaf.name: leaf.to_canonical(leaf.variable) for leaf in leaves(model)}


def load_canonical(model: keras.layers.Layer, tree: Mapping[str, np.ndarray]) -> None:
    """Load a canonical tree into ``model``, all or nothing.

    Raises:
        CheckpointMismatch: keys, shapes or dtypes differ; names every offending key, and the
            model is left unchanged.
    """
    all_leaves = leaves(model)
    check_tree({leaf.name: leaf.spec for leaf in all_leaves}, tree, where="canonical tree")
    for leaf in all_leaves:
        leaf.variable.assign(leaf.from_canonical(tree[leaf.name]))


def trainable_names(model: keras.layers.Layer) -> list[str]:
    """Canonical names of the trainable parameters, in model order."""
    return [leaf.name for leaf in leaves(model) if leaf.variable.trainable]


def set_trainable(model: keras.layers.Layer, trainable: Callable[[str], bool]) -> None:
    """Train only the parameters whose canonical name ``trainable`` accepts; the others are
    frozen: no gradient, no optimizer state (LoRA's base weights).

    Sets each variable's own ``keras.Variable.trainable``: :func:`loss_and_grads`,
    :func:`train_step` and :func:`make_optimizer` take only trainable variables, so call it
    before :func:`make_optimizer`. Buffers (BatchNorm's moving statistics) stay untrainable
    whatever the predicate says, as ``torch``'s ``set_trainable`` touches parameters only.
    """
    # Keras keeps, per layer, the variables created trainable (parameters) apart from the
    # others (buffers), whatever their flag is now: the list its own ``Layer.trainable = True``
    # restores. It tells a frozen parameter from a buffer when a model is unfrozen again.
    params = {id(v) for layer in model._flatten_layers() for v in layer._trainable_variables}
    for leaf in leaves(model):
        leaf.variable.trainable = id(leaf.variable) in params and bool(trainable(leaf.name))


def _trainable_leaves(model) -> list[Leaf]:
    return [leaf for leaf in leaves(model) if leaf.variable.trainable]


# --- models -----------------------------------------------------------------------------------
def _inputs(batch: Mapping[str, object]) -> dict[str, tf.Tensor]:
    return {k: from_numpy(v) for k, v in batch.items()}


def forward(model: keras.Model, batch: Mapping[str, np.ndarray], train: bool = False) -> Tree:
    """The model's outputs (including ``loss``) as numpy arrays.

    Args:
        model: a built model whose call takes a dict of tensors and ``training``.
        batch: numpy arrays, as the workload's ``synthetic_batch`` makes them.
        train: training mode (BatchNorm uses and updates batch statistics, like PyTorch).
    """
    out = model(_inputs(batch), training=train)
    return {k: to_numpy(v) for k, v in out.items()}


def loss_and_grads(
    model: keras.Model, batch: Mapping[str, np.ndarray], train: bool = True
) -> tuple[float, Tree]:
    """The loss and its gradients in canonical names and layouts.

    A parameter the loss does not reach gets a zero gradient.
    """
    trainable = _trainable_leaves(model)
    variables = [leaf.variable for leaf in trainable]
    with tf.GradientTape() as tape:
        loss = model(_inputs(batch), training=train)["loss"]
    grads = tape.gradient(loss, variables)
    return float(loss), {
        leaf.name: leaf.to_canonical(tf.zeros_like(leaf.variable) if g is None else g)
        for leaf, g in zip(trainable, grads, strict=True)
    }


def train_step(model: keras.Model, optimizer, batch: Mapping[str, np.ndarray]) -> float:
    """One optimizer update of ``model`` on ``batch`` in place; returns the loss before it.

    The step is a ``tf.function`` built once per (model, optimizer) and cached on the optimizer,
    so repeated calls with same-shaped batches do not retrace.
    """
    if getattr(optimizer, "model", None) is not model:
        raise ValueError(
            "this optimizer was made for another model; create one with make_optimizer(spec, "
            "schedule, model) for this model"
        )
    if optimizer._train_fn is None:
        variables = [leaf.variable for leaf in _trainable_leaves(model)]
        native = optimizer.native

        @tf.function(reduce_retracing=True)
        def step(inputs):
            with tf.GradientTape() as tape:
                loss = model(inputs, training=True)["loss"]
            # A parameter the loss does not reach (or reaches only through stop_gradient) is
            # updated with a zero gradient, as torch and optax updates are.
            grads = tape.gradient(loss, variables)
            grads = [
                tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)
            ]
            native.apply(grads, variables)
            return loss

        optimizer._train_fn = step
    return float(optimizer._train_fn(_inputs(batch)))


# --- optimizers -------------------------------------------------------------------------------
def make_optimizer(spec: OptimizerSpec, schedule: ScheduleSpec, model: keras.Model):
    """The optimizer of ``spec`` + ``schedule`` over the model's trainable parameters.

    Returns:
        a :class:`tf_optim.Optimizer`: ``.native`` (the Keras optimizer, built), ``.model``,
        ``.state_dict()`` and ``.load_state_dict(state)`` with slots in canonical layout.
    """
    return tf_optim.Optimizer(spec, schedule, model, _trainable_leaves(model))


def make_array_optimizer(
    spec: OptimizerSpec, schedule: ScheduleSpec, params: Mapping[str, np.ndarray]
):
    """The same optimizer over variables made from ``params`` (their dtypes kept).

    Returns:
        a :class:`tf_optim.ArrayOptimizer` with ``.params()``, ``.step(grads)``, ``.native``,
        ``.state_dict()`` and ``.load_state_dict(state)``.
    """
    leaves = [
        Leaf(
            name,
            keras.Variable(
                np.asarray(value),
                dtype=np.asarray(value).dtype.name,
                name=name.replace("/", "_"),
            ),
            IDENTITY,
        )
        for name, value in params.items()
    ]
    return tf_optim.ArrayOptimizer(spec, schedule, leaves)


__all__ = [
    "IDENTITY",
    "KERNEL",
    "LEAF_RULES",
    "NAME",
    "CheckpointMismatch",
    "Leaf",
    "device_summary",
    "devices",
    "forward",
    "from_numpy",
    "leaves",
    "load_canonical",
    "loss_and_grads",
    "make_array_optimizer",
    "make_optimizer",
    "pin_precision",
    "seed",
    "set_trainable",
    "to_canonical",
    "to_numpy",
    "train_step",
    "trainable_names",
]

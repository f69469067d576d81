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

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import types  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402
from tensorflow.core.protobuf.rewriter_config_pb2 import RewriterConfig  # noqa: E402
from tensorflow.core.protobuf.trackable_object_graph_pb2 import TrackableObjectGraph  # noqa: E402
from tensorflow.python.eager import context as tf_context  # noqa: E402

from mlperf_tutor.core.batch import check_model_batch  # noqa: E402
from mlperf_tutor.core.checkpoint import CheckpointMismatch, Tree, check_tree  # noqa: E402
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec, state_key  # noqa: E402
from mlperf_tutor.frameworks import tf_optim  # noqa: E402

if TYPE_CHECKING:
    from mlperf_tutor.parallel.tf import Replicas

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


def forward(
    model: keras.Model,
    batch: Mapping[str, np.ndarray],
    train: bool = False,
    outputs: tuple[str, ...] | None = None,
) -> Tree:
    """The model's outputs (including ``loss``) as numpy arrays.

    Args:
        model: a built model whose call takes a dict of tensors and ``training``.
        batch: numpy arrays, as the workload's ``synthetic_batch`` makes them.
        train: training mode (BatchNorm uses and updates batch statistics, like PyTorch).
        outputs: the names to copy to the host (None: all).
    """
    check_model_batch(model, batch)
    out = model(_inputs(batch), training=train)
    return {k: to_numpy(v) for k, v in out.items() if outputs is None or k in outputs}


def loss_and_grads(
    model: keras.Model, batch: Mapping[str, np.ndarray], train: bool = True
) -> tuple[float, Tree]:
    """The loss and its gradients in canonical names and layouts.

    A parameter the loss does not reach gets a zero gradient.
    """
    check_model_batch(model, batch)
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
    check_model_batch(model, batch)
    if optimizer._train_fn is None:
        variables = [leaf.variable for leaf in _trainable_leaves(model)]
        optimizer._train_fn = compiled_update(model, optimizer.native, variables)
    with _without_memory_optimizer():
        return float(optimizer._train_fn(_inputs(batch)))


def compiled_update(
    model: keras.Model,
    native: keras.optimizers.Optimizer,
    variables: list,
    *,
    jit_compile: bool | None = None,
    loss_dtype=None,
):
    """The update of :func:`train_step` and :class:`Trainer` as one ``tf.function``: forward in
    training mode, gradients of ``variables``, ``native.apply``; returns the loss tensor.

    Shapes are relaxed after the first trace (``reduce_retracing``), so batches of new lengths
    do not each retrace.

    Args:
        model: the model; its call returns a dict with "loss".
        native: the Keras optimizer, built over ``variables``.
        variables: the variables to update, in the optimizer's order.
        jit_compile: ``tf.function``'s: True compiles the whole update with XLA; None leaves
            it to TensorFlow's defaults (no XLA on CPU).
        loss_dtype: cast the loss to it (inside the tape) before differentiating; None keeps
            the model's.
    """

    @tf.function(reduce_retracing=True, jit_compile=jit_compile)
    def update(inputs):
        with tf.GradientTape() as tape:
            loss = model(inputs, training=True)["loss"]
            if loss_dtype is not None:
                loss = tf.cast(loss, loss_dtype)
        # A parameter the loss does not reach (or reaches only through stop_gradient) is
        # updated with a zero gradient, as torch and optax updates are.
        grads = tape.gradient(loss, variables)
        grads = [
            tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)
        ]
        native.apply(grads, variables)
        return loss

    return update


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


# --- training: devices and the Trainer -----------------------------------------------------
DEVICE_NAMES = ("auto", "cpu", "gpu", "tpu")


def _device_line(name: str) -> str:
    """One line naming the logical device ``name``: "/device:GPU:0" -> "gpu:0 (NVIDIA H100)"."""
    spec = tf.DeviceSpec.from_string(name)
    line = f"{spec.device_type.lower()}:{spec.device_index}"
    if spec.device_type == "GPU":
        physical = tf.config.list_physical_devices("GPU")
        if spec.device_index < len(physical):
            details = tf.config.experimental.get_device_details(physical[spec.device_index])
            line += f" ({details.get('device_name', 'GPU')})"
    return line


def _device_name(device: str) -> str:
    """The logical device name (``/device:GPU:0``) that ``device`` means: "auto" | "cpu" | "gpu" |
    "tpu", a logical device ("gpu:1", "/device:GPU:1"), or a line :func:`use_device` returned.

    Raises:
        ValueError: "gpu"/"tpu" where TensorFlow sees none, or a name that is none of these.
    """
    text = device.split(" (", 1)[0].strip()  # use_device's line: "gpu:0 (NVIDIA H100 ...)"
    kind = text.lower()
    if kind == "auto":
        for accelerator in ("TPU", "GPU"):
            found = tf.config.list_logical_devices(accelerator)
            if found:
                return found[0].name
        kind = "cpu"
    if kind in DEVICE_NAMES:
        found = tf.config.list_logical_devices(kind.upper())
        if not found:
            raise ValueError(
                f"device {device!r}: no {kind.upper()} visible to TensorFlow; use --device cpu "
                "or auto"
            )
        return found[0].name
    logical = [d.name for d in tf.config.list_logical_devices()]
    try:
        want = tf.DeviceSpec.from_string(text if text.startswith("/") else f"/device:{text}")
    except ValueError:
        want = None
    for name in logical:
        have = tf.DeviceSpec.from_string(name)
        if (
            want is not None
            and want.device_type == have.device_type
            and (want.device_index or 0) == have.device_index
        ):
            return name
    raise ValueError(f"unknown device {device!r}; choose one of {[*DEVICE_NAMES, *logical]}")


def use_device(device: str = "auto") -> str:
    """Resolve "auto" | "cpu" | "gpu" | "tpu" (or a logical device such as "gpu:1") to the
    device TensorFlow will train on, and return one line naming it: "cpu:0", "gpu:0 (NVIDIA
    H100 80GB HBM3)", "tpu:0". :class:`Trainer` takes the line (or any name accepted here).

    What "the default for what follows" means in TensorFlow: TF itself places new variables and
    ops on the first GPU when there is one, and the :class:`Trainer` runs its whole update inside
    ``tf.device`` of this device (its optimizer state is created there too). Variables that
    exist already stay where TF put them, since a ``tf.device`` scope acts only on creation. So
    "cpu" on a machine with a GPU also hides the GPUs from TensorFlow
    (``tf.config.set_visible_devices``), which TF allows only before its first op; after that,
    the model's variables stay on the GPU and the step reads them from there.

    Raises:
        ValueError: "gpu"/"tpu" where TensorFlow sees none (use "cpu" or "auto"), or an
            unknown name (the message lists the valid ones).
    """
    if device.split(" (", 1)[0].strip().lower() == "cpu" and tf.config.list_physical_devices("GPU"):
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF is initialised: its devices can no longer change
            pass
    return _device_line(_device_name(device))


# The float32 parameters of each precision's model, and its Keras dtype policy.
PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}


@contextlib.contextmanager
def _without_memory_optimizer():
    """Call ``tf.function`` s without Grappler's memory optimizer (and so deterministically).

    Where a gradient sum (``AddN``) has large inputs that become ready at different times,
    the memory optimizer rewrites it into ``AccumulateNV2``, which TF lowers to a temporary
    variable that each input is added to *as it arrives*: the order of the float sum then
    follows the inter-op thread schedule, and the result changes in its last bit from run to
    run (seen on CPU for gpt3 tiny with dropout: block-boundary gradients of 2048-token
    sequences). ``enable_op_determinism`` does not cover it. TF has no public switch for this
    one optimizer, so the eager context's function-call options get a copy of its config with
    ``memory_optimization = NO_MEM_OPT`` for the call, as ``tf.experimental.
    function_executor_type`` sets the executor. The other memory rewrites (swapping to host,
    recomputation) act only on GPUs or annotated graphs; the cost is the peak memory the
    rewrite would have saved, and no time on CPU (measured: the same step time or less).
    """
    ctx = tf_context.context()
    old = ctx.function_call_options
    config = tf.compat.v1.ConfigProto()
    config.ParseFromString(old.config_proto_serialized)
    config.graph_options.rewrite_options.memory_optimization = RewriterConfig.NO_MEM_OPT
    ctx.function_call_options = tf_context.FunctionCallOptions(
        executor_type=old.executor_type, config_proto=config
    )
    try:
        yield
    finally:
        ctx.function_call_options = old


def seed_generators(model: keras.layers.Layer) -> dict[str, keras.random.SeedGenerator]:
    """Every ``keras.random.SeedGenerator`` of ``model`` (dropout's random streams) by attribute
    path, e.g. ``blocks.0.attention.dropout.seed_generator``.

    Each holds its stream's position in an int64 state variable (a non-trainable model variable
    that ``model.weights`` leaves out); dropout draws its mask from the state and advances it.

    Raises:
        ValueError: a model variable outside ``model.weights`` is not the state of a generator
            reached through public attributes (it would be missing from checkpoints).
    """
    found: dict[str, keras.random.SeedGenerator] = {}
    seen: set[int] = set()
    for prefix, layer, _ in _walk(model):
        for attr, value in vars(layer).items():
            if isinstance(value, keras.random.SeedGenerator) and id(value) not in seen:
                seen.add(id(value))
                found[prefix + attr] = value
    known = {id(v) for v in model.weights} | {id(g.state) for g in found.values()}
    hidden = [v.path for v in model.variables if id(v) not in known]
    if hidden:
        raise ValueError(
            f"model {model.name!r} has state variables {hidden} that are neither weights nor "
            "the state of a seed generator held in a layer attribute; the Trainer could not "
            "checkpoint them"
        )
    return found


def _frozen_parameters(model: keras.layers.Layer) -> list[keras.Variable]:
    """Float parameters that do not train (LoRA's base); buffers (BatchNorm statistics) and
    seed states are not parameters. Keras keeps each layer's variables created trainable apart
    from the others whatever their flag is now (see :func:`set_trainable`)."""
    params = {id(v) for layer in model._flatten_layers() for v in layer._trainable_variables}
    return [
        leaf.variable
        for leaf in leaves(model)
        if id(leaf.variable) in params
        and not leaf.variable.trainable
        and "float" in leaf.variable.dtype
    ]


def _store_in_bfloat16(variable: keras.Variable) -> None:
    """Keep ``variable``'s value in bfloat16 from now on, in place.

    Keras 3 has no public way to change the dtype of a created variable, and layers hold the
    variable object itself (``Dense._kernel``), so the object stays and its backing
    ``tf.Variable`` is re-created in bfloat16 (Keras' own ``Variable._initialize``, which its
    constructor calls). Under the ``mixed_bfloat16`` policy Keras casts float variables to
    bfloat16 where a layer reads them; this one is already, so the read is free and the memory
    half.
    """
    value = tf.cast(variable.value, tf.bfloat16)
    variable._dtype = "bfloat16"
    variable._initialize(value)


class Trainer:
    """Trains one model: placement, precision, the compiled update, RNG streams, native checkpoints.

    Placement: the update runs inside ``tf.device(device)``, and the optimizer state (and,
    under bf16, the frozen weights) are created there; the model's variables stay where TF put
    them when it was built (the GPU if there is one; see :func:`use_device`).

    Precision "fp32": a float32 model (``dtype="float32"``), nothing else changed; the losses are
    those of :func:`train_step` (the same compiled update). "bf16": the model must be built with
    Keras' ``mixed_bfloat16`` policy (``tf_model.build(cfg, dtype="mixed_bfloat16")``): float32
    variables, which are the master weights and which the optimizer state follows, read as
    bfloat16 inside each layer; softmax, norm statistics and losses are float32 in the models,
    and the step casts the loss to float32 before differentiating. Frozen parameters (LoRA's
    base) are stored in bfloat16 (:func:`_store_in_bfloat16`); :meth:`weights` gives them back
    as float32 and :meth:`load_state` takes them as float32, so canonical trees keep their
    float32 dtypes. ``model`` (the same object) keeps them in bfloat16, so export it with
    :meth:`weights` rather than :func:`to_canonical`.

    The update is one ``tf.function`` (:func:`compiled_update`, shared with :func:`train_step`):
    XLA-compiled (``jit_compile=True``) on a GPU or TPU when the model supports it (Keras'
    ``model.jit_compile``: every layer's ``supports_jit``), TensorFlow's graph executor on CPU
    (as Keras does; the numbers are then bit for bit those of :func:`train_step`). It runs
    without Grappler's memory optimizer, which makes CPU runs reproducible bit for bit (see
    :func:`_without_memory_optimizer`).

    RNG: dropout draws from the model's ``keras.random.SeedGenerator`` s (:func:`seed_generators`);
    ``seed`` sets each one's state from (seed, its path), and checkpoints carry the states, so a
    restored run draws the masks an uninterrupted one would.

    Args:
        model: a built workload model with canonical weights loaded.
        spec, schedule: the optimizer (``OptimizerSpec``, ``ScheduleSpec``), as for
            :func:`make_optimizer`.
        precision: "fp32" or "bf16".
        device: what :func:`use_device` returned, or a name it accepts.
        seed: seeds every dropout stream of the model.
        plan: data parallelism: what ``mlperf_tutor.parallel.tf.realise(wl, cfg, plan)`` returned
            (a ``MirroredStrategy`` and the workload's loss weighting). Build the model and
            create the Trainer inside ``mlperf_tutor.parallel.tf.building(plan)``; each step
            then runs on every replica's slice of the global batch and applies the summed
            gradients once (``device`` is not used: the strategy places the replicas).

    Raises:
        ValueError: an unknown precision or device, or a model whose dtype policy does not
            match the precision; under a plan, a model built outside its strategy's scope
            (``mlperf_tutor.parallel.ParallelError``).
    """

    CHECKPOINT = "ckpt"  # the file prefix of tf.train.Checkpoint inside a save directory

    def __init__(
        self,
        model: keras.Model,
        spec: OptimizerSpec,
        schedule: ScheduleSpec,
        *,
        precision: str = "fp32",
        device: str = "cpu",
        seed: int = 0,
        plan: Replicas | None = None,
    ):
        if precision not in PRECISION_POLICIES:
            raise ValueError(
                f"unknown precision {precision!r}; choose one of {list(PRECISION_POLICIES)}"
            )
        policy, want = model.dtype_policy.name, PRECISION_POLICIES[precision]
        if policy != want:
            raise ValueError(
                f"precision {precision!r} needs a model built with dtype={want!r} (the "
                f"workload's tf_model.build(cfg, dtype={want!r})); model {model.name!r} has "
                f"the dtype policy {policy!r}"
            )
        if plan is not None:
            plan.check(model)
        self.precision = precision
        self.plan = plan
        self.device = _device_name(device)
        self._model = model
        self._leaves = leaves(model)
        self._rng = seed_generators(model)
        # Under a plan, the optimizer (its slots mirrored) is made in the strategy's scope.
        placement = tf.device(self.device) if plan is None else plan.strategy.scope()
        with placement:
            frozen = _frozen_parameters(model) if precision == "bf16" else []
            for variable in frozen:
                _store_in_bfloat16(variable)
            self._bf16_frozen = {id(v) for v in frozen}
            self._optimizer = make_optimizer(spec, schedule, model)
        self._seed(seed)
        native = self._optimizer.native
        on_accelerator = tf.DeviceSpec.from_string(self.device).device_type != "CPU"
        variables = [leaf.variable for leaf in _trainable_leaves(model)]
        if plan is None:
            self._update = compiled_update(
                model,
                native,
                variables,
                jit_compile=True
                if on_accelerator and getattr(model, "jit_compile", False)
                else None,
                loss_dtype=tf.float32,
            )
        else:
            self._update = plan.compiled_update(model, native, variables, loss_dtype=tf.float32)
        # What a checkpoint holds, by group and key.
        covered = {id(native.iterations)}
        slots = {"step": native.iterations}
        for leaf in _trainable_leaves(model):
            for slot in spec.slots:
                variable = native.slot(slot, leaf.variable)
                slots[state_key(slot, leaf.name)] = variable
                covered.add(id(variable))
        uncovered = [v.path for v in native.variables if id(v) not in covered]
        if uncovered:
            raise ValueError(f"optimizer variables {uncovered} have no canonical name")
        del slots["step"]
        self._state = {
            "model": {leaf.name: leaf.variable for leaf in self._leaves},
            "optimizer": slots,
            "step": native.iterations,
            "rng": {path: gen.state for path, gen in self._rng.items()},
        }

    def _seed(self, seed: int) -> None:
        for path, gen in self._rng.items():
            entropy = [seed & 0xFFFFFFFF, seed >> 32, zlib.crc32(path.encode())]
            stream = np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0]
            gen.state.assign(np.array([stream, 0], dtype=gen.state.dtype))

    # --- training ---------------------------------------------------------------------------
    def step(self, batch: Mapping[str, np.ndarray]) -> tf.Tensor:
        """One update (training mode: dropout on, BatchNorm statistics updated). Returns the
        float32 loss as a tensor, without waiting for it (see :meth:`loss_value`)."""
        check_model_batch(self._model, batch)
        if self.plan is not None:
            with _without_memory_optimizer():
                return self._update(self.plan.split(batch))
        with tf.device(self.device), _without_memory_optimizer():
            return self._update(_inputs(batch))

    def evaluating(self) -> contextlib.AbstractContextManager:
        """A context for forwards outside :meth:`step` (evaluation): the step's device (the
        model's ``mixed_bfloat16`` policy already holds for any call)."""
        return tf.device(self.device)

    def loss_value(self, handle) -> float:
        """The float of a loss that :meth:`step` returned (waits for the update)."""
        return float(handle)

    @property
    def model(self) -> keras.Model:
        """The model itself, with the current weights (frozen ones in bfloat16 under bf16)."""
        return self._model

    @property
    def steps(self) -> int:
        """Updates applied so far (the optimizer's ``iterations``: the schedule's position)."""
        return int(self._optimizer.native.iterations.numpy())

    # --- canonical state --------------------------------------------------------------------
    def _specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Canonical (shape, dtype) of every weight: float32 for the bf16-stored frozen ones."""
        specs = {}
        for leaf in self._leaves:
            shape, dtype = leaf.spec
            specs[leaf.name] = (
                shape,
                "float32" if id(leaf.variable) in self._bf16_frozen else dtype,
            )
        return specs

    def weights(self) -> dict[str, np.ndarray]:
        """Canonical weights: float32 masters, buffers, and frozen weights (bfloat16-stored
        under bf16) given back as float32."""
        return {
            leaf.name: leaf.to_canonical(leaf.variable).astype(np.float32)
            if id(leaf.variable) in self._bf16_frozen
            else leaf.to_canonical(leaf.variable)
            for leaf in self._leaves
        }

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The canonical optimizer state (``core.optim``'s keys), ``step`` included."""
        return self._optimizer.state_dict()

    def load_state(
        self, weights: Mapping[str, np.ndarray], optimizer_state: Mapping | None = None
    ) -> None:
        """Load canonical weights (float32, as :meth:`weights` gives them) and, if given, a
        canonical optimizer state (which sets :attr:`steps`); the RNG streams stay.

        Raises:
            CheckpointMismatch: a key, shape or dtype differs; every offending key is named
                and nothing is loaded.
        """
        check_tree(self._specs(), weights, where="canonical tree")
        if optimizer_state is not None:
            optimizer_state = {k: np.asarray(v) for k, v in optimizer_state.items()}
            check_tree(
                self._optimizer._state_specs(),
                optimizer_state,
                where="optimizer state",
                check_dtype=False,
            )
        for leaf in self._leaves:
            dtype = tf.as_dtype(leaf.variable.dtype).as_numpy_dtype
            leaf.variable.assign(leaf.from_canonical(weights[leaf.name]).astype(dtype))
        if optimizer_state is not None:
            self._optimizer.load_state_dict(optimizer_state)

    # --- native checkpoints -----------------------------------------------------------------
    def _checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(**self._state)

    def _checkpoint_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        specs = {}
        for group, variables in self._state.items():
            items = variables.items() if isinstance(variables, dict) else [("", variables)]
            for key, variable in items:
                dtype = np.dtype(tf.as_dtype(variable.dtype).as_numpy_dtype).name
                specs[f"{group}/{key}".rstrip("/")] = (tuple(variable.shape), dtype)
        return specs

    def save(self, directory: pathlib.Path) -> None:
        """Write the whole training state into ``directory`` (which exists) with
        ``tf.train.Checkpoint``: ``ckpt.index`` and ``ckpt.data-*``. Four groups, keyed by
        canonical names: ``model`` (every weight and buffer), ``optimizer`` (every slot, keyed
        as in :meth:`optimizer_state`), ``step`` (the update count) and ``rng`` (every seed
        generator's state, keyed by its path)."""
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            raise ValueError(f"checkpoint directory {directory} does not exist; create it first")
        if (directory / f"{self.CHECKPOINT}.index").exists():
            raise ValueError(f"checkpoint directory {directory} already holds a checkpoint")
        self._checkpoint().write(str(directory / self.CHECKPOINT))

    def restore(self, directory: pathlib.Path) -> None:
        """Read what :meth:`save` wrote back into this trainer (same model, precision and
        optimizer).

        Every key, shape and dtype is checked against the checkpoint's index before anything
        is read, so a checkpoint that does not match leaves the trainer unchanged; a data file
        corrupt past its index fails during the read, which may have restored part of it.

        Raises:
            ValueError: naming ``directory``: no checkpoint there, unreadable or corrupt files,
                or (a ``CheckpointMismatch``) every missing, unexpected or misshapen entry.
        """
        directory = pathlib.Path(directory)
        prefix = str(directory / self.CHECKPOINT)
        if not (directory / f"{self.CHECKPOINT}.index").is_file():
            raise ValueError(
                f"checkpoint {directory} holds no TensorFlow checkpoint ({self.CHECKPOINT}.index "
                "is missing); give the directory that Trainer.save wrote"
            )
        try:
            reader = tf.train.load_checkpoint(prefix)
            graph = TrackableObjectGraph.FromString(
                reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
            )
        except (tf.errors.OpError, DecodeError) as e:
            message = getattr(e, "message", None) or str(e)
            raise ValueError(f"checkpoint {directory} cannot be read: {message}") from None
        check_tree(
            self._checkpoint_specs(),
            _checkpoint_entries(graph, reader),
            where=f"checkpoint {directory}",
            hint="restore it into a trainer of the same workload, preset, precision and optimizer",
        )
        try:
            self._checkpoint().read(prefix).assert_consumed()
        except (tf.errors.OpError, AssertionError, ValueError) as e:
            message = getattr(e, "message", None) or str(e)
            raise ValueError(f"checkpoint {directory} could not be restored: {message}") from None


def _checkpoint_entries(graph, reader) -> dict[str, types.SimpleNamespace]:
    """``group/key`` -> (shape, dtype) of every variable in a checkpoint that
    :meth:`Trainer.save` wrote, read from its object graph (local names, unescaped) and index."""
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()

    def entry(node_id: int):
        keys = [a.checkpoint_key for a in graph.nodes[node_id].attributes]
        if len(keys) != 1 or keys[0] not in shapes:
            return None
        dtype = np.dtype(dtypes[keys[0]].as_numpy_dtype)
        return types.SimpleNamespace(shape=tuple(shapes[keys[0]]), dtype=dtype)

    out = {}
    for group in graph.nodes[0].children:
        value = entry(group.node_id)
        if value is not None:
            out[group.local_name] = value
            continue
        for child in graph.nodes[group.node_id].children:
            value = entry(child.node_id)
            if value is not None:
                out[f"{group.local_name}/{child.local_name}"] = value
    return out


__all__ = [
    "IDENTITY",
    "KERNEL",
    "LEAF_RULES",
    "DEVICE_NAMES",
    "NAME",
    "PRECISION_POLICIES",
    "CheckpointMismatch",
    "Leaf",
    "Trainer",
    "compiled_update",
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
    "seed_generators",
    "set_trainable",
    "to_canonical",
    "to_numpy",
    "train_step",
    "trainable_names",
    "use_device",
]

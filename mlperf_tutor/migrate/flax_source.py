"""Idiomatic Flax NNX source code for a PyTorch module built from standard layers.

``to_flax_source(model, example_input)`` writes one ``nnx.Module`` class per torch module class
(instances of a class that differ only in hyperparameters share one class whose ``__init__``
takes those as keyword arguments), with the torch attribute names, explicit hyperparameters
(LayerNorm/BatchNorm epsilon, BatchNorm momentum as ``1 - torch momentum``, GELU's
approximation, conv padding) and shape comments from a run on the example input. A custom
module qualifies when ``torch.fx`` traces its forward into calls of its submodules, simple
activations, ``flatten``, ``+``, ``-``, ``*`` and indexing a layer's outputs. ``nn.LSTM``,
``nn.GRU`` and ``nn.MultiheadAttention`` become classes written out in the generated file with
torch's parameter names and layouts. Any other submodule runs its ``torch.export`` graph through
the interpreter (:func:`interpreted`), and the generated class says which module and why; with
``fallback=False`` it raises :class:`UnsupportedModuleError` naming the module and the operation.

Layout: the generated modules take and return 4-D activations as NHWC (Flax's convolution
layout) where torch has NCHW; every 4-D value is taken to be an image. Flatten transposes back
to NCHW first, so features after it are in torch's order and Linear weights load unchanged.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import torch
from torch import nn

from mlperf_tutor.core.parity import OUTPUT_ATOL, VerificationError
from mlperf_tutor.migrate.flax_layers import UnsupportedModuleError
from mlperf_tutor.migrate.flax_writer import Writer, header

__all__ = ["FlaxSource", "UnsupportedModuleError", "VerificationError", "to_flax_source"]


@dataclasses.dataclass
class FlaxSource:
    """Generated Flax NNX code for a torch module, and its weight conversion.

    Attributes:
        code: the module source (imports, one class per torch module class, root class last).
        class_name: the root class; ``ClassName(rngs=nnx.Rngs(0))`` builds it.
        weight_map: torch ``state_dict`` key -> (NNX path, axis permutation or None).
        torch_model: the module the code was written for.
    """

    code: str
    class_name: str
    weight_map: dict[str, tuple[tuple, tuple | None]]
    torch_model: nn.Module = dataclasses.field(repr=False)

    def __str__(self) -> str:
        return self.code

    def convert_weights(self, state_dict=None) -> dict:
        """Torch weights (``state_dict``; default: the torch model's) as a nested dict of numpy
        arrays keyed like ``nnx.to_pure_dict(nnx.state(model))``: Linear kernels transposed,
        conv kernels OIHW -> HWIO, norm weights -> ``scale``, running stats -> ``mean``/``var``.
        Every key must match: missing or unexpected ones raise one error naming them all."""
        state_dict = self.torch_model.state_dict() if state_dict is None else state_dict
        given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
        missing = sorted(set(self.weight_map) - given)
        unexpected = sorted(given - set(self.weight_map))
        if missing or unexpected:
            raise ValueError(
                f"state_dict does not fit {self.class_name}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        nested: dict = {}
        for key, (path, perm) in self.weight_map.items():
            value = state_dict[key]
            if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
                import ml_dtypes  # numpy has no bfloat16; JAX's own dtype package has

                value = value.detach().cpu().float().numpy().astype(ml_dtypes.bfloat16)
            elif isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            value = np.asarray(value)
            node = nested
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value.transpose(perm) if perm else value
        return nested

    def load_weights(self, model, state_dict=None):
        """Load torch weights into an instance of the generated class (in place); returns it."""
        import jax.numpy as jnp

        errors = []

        def load(node, tree, path):
            for part, value in tree.items():
                child = node[part] if isinstance(part, int) else getattr(node, part)
                if isinstance(value, dict):
                    load(child, value, (*path, part))
                elif tuple(child.shape) != value.shape:
                    errors.append(
                        f"{'.'.join(map(str, (*path, part)))}: {child.shape} vs {value.shape}"
                    )
                else:
                    child.set_value(jnp.asarray(value))

        load(model, self.convert_weights(state_dict), ())
        if errors:
            raise ValueError(f"weights do not fit {self.class_name} (nnx vs converted): {errors}")
        return model

    def module(self) -> types.ModuleType:
        """The code executed in a fresh module namespace."""
        module = types.ModuleType(f"flax_port_{self.class_name.lower()}")
        exec(compile(self.code, f"<flax port of {self.class_name}>", "exec"), module.__dict__)
        return module

    def build(self, state_dict=None, seed: int = 0):
        """An instance of the generated root class with the torch weights loaded."""
        from flax import nnx

        model = getattr(self.module(), self.class_name)(rngs=nnx.Rngs(seed))
        return self.load_weights(model, state_dict)

    def verify(self, example_input, atol: float = OUTPUT_ATOL) -> float:
        """Max-abs difference of the built NNX model (eval mode) against the torch model (eval
        mode, no grad) on ``example_input`` (torch layout; 4-D inputs are given to NNX as NHWC).

        Raises:
            VerificationError: when the difference exceeds ``atol``.
        """
        import jax

        inputs = _inputs(example_input)
        with _eval(self.torch_model), torch.no_grad():
            expected = self.torch_model(*inputs)
        port = self.build()
        port.eval()
        nhwc = [x.permute(0, 2, 3, 1) if x.dim() == 4 else x for x in inputs]
        with jax.default_matmul_precision("highest"):
            got = port(*(jax.numpy.asarray(x.numpy()) for x in nhwc))
        pairs = list(zip(_flat(expected), _flat(got), strict=True))
        err = 0.0
        for want, have in pairs:
            have = np.asarray(have)
            have = have.transpose(0, 3, 1, 2) if have.ndim == 4 else have
            err = max(err, float(np.max(np.abs(have.astype(np.float64) - want.numpy()))))
        if err > atol:
            raise VerificationError(
                f"{self.class_name} differs from torch by max-abs {err:.3g} > {atol:g}"
            )
        return err


def interpreted(blob: str, nhwc: bool):
    """The function that generated code calls for a module that could not become readable
    Flax: ``fn(weights, *inputs)`` runs the module's embedded ``torch.export`` program
    (``blob``: base64 of the zlib-compressed ``torch.export.save`` file) through
    :mod:`mlperf_tutor.migrate`'s interpreter. ``weights`` maps torch ``state_dict`` names to
    arrays (those left out keep the exported values); with ``nhwc``, 4-D inputs and outputs are
    NHWC and are transposed around the NCHW graph."""
    import base64
    import io
    import zlib

    import jax.numpy as jnp

    from mlperf_tutor.migrate.export import KEEP
    from mlperf_tutor.migrate.interpreter import GraphFunction

    program = torch.export.load(io.BytesIO(zlib.decompress(base64.b64decode(blob))))
    table = torch.export.default_decompositions()
    for op in KEEP:
        table.pop(op, None)
    graph = GraphFunction(program.run_decompositions(table))
    exported = {k: jnp.asarray(v.detach().numpy()) for k, v in program.state_dict.items()}

    def to_graph(x):
        return jnp.transpose(x, (0, 3, 1, 2)) if nhwc and jnp.ndim(x) == 4 else x

    def from_graph(x):
        return jnp.transpose(x, (0, 2, 3, 1)) if nhwc and jnp.ndim(x) == 4 else x

    def fn(weights, *inputs):
        state = exported | dict(weights)
        outputs, _ = graph(state, [to_graph(x) for x in inputs])
        outputs = [from_graph(x) for x in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return fn


def _flat(tree) -> list:
    if isinstance(tree, dict):
        return [leaf for k in tree for leaf in _flat(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [leaf for v in tree for leaf in _flat(v)]
    return [tree]


def _inputs(example_input) -> tuple:
    items = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    return tuple(
        torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x) for x in items
    )


class _eval:
    """Eval mode, TF32 off; every module's training flag and the TF32 flags restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = {m: m.training for m in self.model.modules()}
        self.tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        self.model.eval()

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.tf32
        for mod, training in self.modes.items():
            mod.training = training


def to_flax_source(
    model: nn.Module, example_input, *, class_name: str | None = None, fallback: bool = True
) -> FlaxSource:
    """Write Flax NNX source code equivalent to ``model`` (see the module docstring).

    Args:
        model: a torch module built from standard layers (Linear, Conv2d, BatchNorm1d/2d,
            LayerNorm, GroupNorm, Embedding, Dropout, ReLU/GELU/SiLU/Tanh/Sigmoid/LeakyReLU,
            Flatten, MaxPool2d/AvgPool2d/AdaptiveAvgPool2d(1), LSTM, GRU, MultiheadAttention,
            Sequential and its subclasses that keep its forward, ModuleList, ModuleDict) and
            custom modules whose forward torch.fx traces into calls of those, ``+``, ``-``,
            ``*``, functional activations, ``flatten`` and indexing a layer's outputs.
        example_input: a tensor or numpy array, or a tuple of them: the forward's positional
            arguments (torch layout). The model runs once on it in eval mode, for shapes.
        class_name: name of the root class (default: the torch class name; "Model" for an
            ``nn.Sequential``).
        fallback: a submodule that cannot become readable Flax becomes a class that runs its
            ``torch.export`` graph (eval mode, the example's shapes) through the interpreter
            (:func:`interpreted`), with a comment naming the module and why; False raises
            :class:`UnsupportedModuleError` instead.

    Returns:
        A :class:`FlaxSource`: ``.code``, ``.build()``, ``.convert_weights()``, ``.verify()``.

    Raises:
        UnsupportedModuleError: naming the module and the layer or traced operation (with
            ``fallback``: only when the root module itself is not translatable, or a module
            that is not cannot be exported either).
    """
    inputs = _inputs(example_input)
    with _eval(model), torch.no_grad():
        writer = Writer(model, inputs, class_name, fallback)
        classes, root = writer.classes()
    if root is None:
        raise UnsupportedModuleError(
            f"the model is a single {type(model).__name__} layer; wrap it in an nn.Sequential "
            "or a module of its own"
        )
    code = "\n\n\n".join(classes) + "\n"
    batchnorm = any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())
    code = header(root, type(model).__name__, writer.nhwc, batchnorm, code) + code
    return FlaxSource(code, root, writer.weights, model)

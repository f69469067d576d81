"""Layer-by-layer divergence between a PyTorch module and its hand port to Flax NNX.

Both models run once on the same batch while every submodule's inputs and outputs are recorded:
PyTorch through forward hooks (eval mode, no grad), NNX by wrapping the ``__call__`` of each
submodule's class for the duration of the call (restored afterwards). Modules are matched by
attribute path: torch ``named_modules()`` names (``blocks.0.mlp.fc_in``) against NNX graph paths
joined by "." (``nnx.List`` indices are path segments too; the ``layers`` segment of an
``nnx.Sequential`` is dropped, so ``features.layers.0`` matches torch's ``features.0``).

The first divergence is found by walking the torch call tree from the root: inside a diverging
call, the first diverging child call is followed when its inputs still agree; when they do not,
the parent's own code between its children made the difference, and the parent is reported. So
a wrong GELU inside ``blocks.1.mlp`` is reported as ``blocks.1.mlp.act`` when both ports call
an ``act`` module, else as ``blocks.1.mlp``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mlperf_tutor.core.parity import OUTPUT_ATOL, errors

ROOT = "<root>"
# Statuses of a row. Only "diff" and "mismatch" fail; the others say why nothing was compared.
OK, DIFF, MISMATCH, MISSING, NOT_CALLED = "ok", "diff", "mismatch", "missing", "not called"


@dataclasses.dataclass
class _Call:
    """One recorded call of a module: its flattened inputs and outputs (numpy arrays)."""

    name: str
    index: int  # the module's n-th call (0-based)
    parent: _Call | None
    inputs: list[tuple[str, np.ndarray]]
    outputs: list[tuple[str, np.ndarray]] | None = None
    children: list[_Call] = dataclasses.field(default_factory=list)


class _Recorder:
    """Collects the call tree of one forward pass, in call-start order."""

    def __init__(self, to_numpy: Callable[[Any], np.ndarray | None]):
        self.to_numpy = to_numpy
        self.calls: list[_Call] = []
        self.by_name: dict[str, list[_Call]] = {}
        self.stack: list[_Call] = []

    def enter(self, name: str, args: tuple, kwargs: Mapping) -> _Call:
        calls = self.by_name.setdefault(name, [])
        parent = self.stack[-1] if self.stack else None
        call = _Call(name, len(calls), parent, _leaves((tuple(args), dict(kwargs)), self.to_numpy))
        calls.append(call)
        self.calls.append(call)
        if parent is not None:
            parent.children.append(call)
        self.stack.append(call)
        return call

    def leave(self, call: _Call, output: Any) -> None:
        call.outputs = _leaves(output, self.to_numpy)

    def pop(self) -> None:
        self.stack.pop()


def _leaves(tree: Any, to_numpy, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """Array leaves of nested dicts/tuples/lists as (key path, numpy array), in order."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (tuple, list)):
        items = enumerate(tree)
    else:
        array = to_numpy(tree)
        return [] if array is None else [(prefix, array)]
    out = []
    for key, value in items:
        out += _leaves(value, to_numpy, f"{prefix}.{key}" if prefix else str(key))
    return out


@dataclasses.dataclass(frozen=True)
class LayerDiff:
    """One module call compared between the torch module and the NNX port.

    Attributes:
        name: the module's attribute path (``blocks.0.mlp.fc_in``; the model itself is ROOT).
        call: which call of that module (0 for the first; modules can be called several times).
        module: the torch module's class name.
        depth: nesting depth of the call (the root is 0).
        shape: the torch output's shape; a tuple of shapes when the output has several arrays.
        max_abs: max |torch - jax| over the output arrays (None when nothing was compared).
        rel: the largest ||torch - jax|| / ||torch|| over the output arrays.
        inputs_ok: whether the inputs agreed within atol (None when they could not be compared).
        status: "ok", "diff" (beyond atol), "mismatch" (shapes or structure differ),
            "missing" (no NNX module at that path) or "not called" (the NNX module exists
            but was not called this often).
    """

    name: str
    call: int
    module: str
    depth: int
    shape: tuple
    max_abs: float | None
    rel: float | None
    inputs_ok: bool | None
    status: str

    @property
    def ok(self) -> bool:
        """False only for rows that were compared and failed."""
        return self.status not in (DIFF, MISMATCH)

    @property
    def label(self) -> str:
        return self.name if self.call == 0 else f"{self.name} (call {self.call + 1})"


@dataclasses.dataclass(repr=False)
class LayerDiffReport:
    """Per-module comparison of a torch module and its NNX port, in torch execution order.

    Attributes:
        rows: one :class:`LayerDiff` per torch module call.
        atol: the max-abs bound each output was held to.
        first_divergence: the innermost module where the outputs first differ (see the module
            docstring), or None when every compared module agrees.
        unmatched_jax: NNX module paths that were called but have no torch module of that name
            (a renamed attribute shows up here and as "missing" above).
    """

    rows: list[LayerDiff]
    atol: float
    first_divergence: str | None
    unmatched_jax: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def compared(self) -> list[LayerDiff]:
        return [row for row in self.rows if row.max_abs is not None]

    def __getitem__(self, name: str) -> LayerDiff:
        """The first call of the module at ``name``."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no module {name!r} in the report; modules: {[r.name for r in self.rows]}")

    def __str__(self) -> str:
        failed = sum(not row.ok for row in self.rows)
        head = (
            f"layer diff torch vs flax nnx (atol {self.atol:g}): {len(self.compared)} module "
            f"calls compared, {failed} differ; first divergence: {self.first_divergence}"
        )
        table = [("module", "type", "shape", "max_abs", "rel", "inputs", "status")]
        for row in self.rows:
            table.append(
                (
                    "  " * row.depth + row.label,
                    row.module,
                    str(row.shape),
                    "-" if row.max_abs is None else f"{row.max_abs:.2e}",
                    "-" if row.rel is None else f"{row.rel:.2e}",
                    {None: "-", True: "same", False: "differ"}[row.inputs_ok],
                    row.status.upper() if not row.ok else row.status,
                )
            )
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines = [head] + [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table
        ]
        if self.unmatched_jax:
            lines.append(
                f"NNX modules without a torch counterpart: {', '.join(self.unmatched_jax)}"
            )
        return "\n".join(lines)

    __repr__ = __str__  # assertion messages and notebooks show the table

    def to_dataframe(self):
        """The rows as a pandas DataFrame (one column per :class:`LayerDiff` field, plus ok)."""
        import pandas as pd

        records = [dataclasses.asdict(row) | {"ok": row.ok} for row in self.rows]
        return pd.DataFrame.from_records(records)


def _compare(torch_leaves, jax_leaves, layout: str, atol: float):
    """(max_abs, rel, status) of two flattened outputs; max_abs is None on a mismatch."""
    if not torch_leaves and not jax_leaves:
        return None, None, OK
    if len(torch_leaves) != len(jax_leaves):
        return None, None, MISMATCH
    worst_abs, worst_rel = 0.0, 0.0
    # Paired in order: dict keys or tuple positions may be spelled differently in a port.
    for (_, t), (_, j) in zip(torch_leaves, jax_leaves, strict=True):
        if layout == "NHWC" and j.ndim == 4:
            j = j.transpose(0, 3, 1, 2)  # NNX conv activations (B, H, W, C) -> torch (B, C, H, W)
        if t.shape != j.shape and t.size == j.size and _squeezed(t) == _squeezed(j):
            # Same data, a singleton axis more or less (e.g. grouped-query attention
            # probabilities (B, K, G, T, S) with G = 1 against torch's (B, N, T, S)).
            j = j.reshape(t.shape)
        if t.shape != j.shape:
            return None, None, MISMATCH
        max_abs, rel = errors(j, t)
        worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, rel)
    return worst_abs, worst_rel, OK if worst_abs <= atol else DIFF


def _squeezed(a: np.ndarray) -> tuple[int, ...]:
    return tuple(n for n in a.shape if n != 1)


def _torch_to_numpy(x):
    import torch

    if not isinstance(x, torch.Tensor):
        return None
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
        x = x.float()
    return x.numpy()


def _jax_to_numpy(x):
    import jax

    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            "diff_layers records NNX activations eagerly, but the model ran under a JAX transform "
            "(nnx.jit, jax.jit, scan, ...); call the model without jit for the diff"
        )
    if isinstance(x, (jax.Array, np.ndarray)):
        return np.asarray(x)
    return None


def _record_torch(module, batch, torch_fn) -> _Recorder:
    import torch

    recorder = _Recorder(_torch_to_numpy)
    handles, modes = [], {m: m.training for m in module.modules()}

    for name, sub in module.named_modules():
        name = name or ROOT

        def pre(mod, args, kwargs, name=name):
            recorder.enter(name, args, kwargs)

        def post(mod, args, kwargs, output):
            recorder.leave(recorder.stack[-1], output)
            recorder.pop()

        handles.append(sub.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(sub.register_forward_hook(post, with_kwargs=True))
    module.eval()
    try:
        with torch.no_grad():
            torch_fn(module, batch)
    finally:
        for handle in handles:
            handle.remove()
        for mod, training in modes.items():
            mod.training = training
    return recorder


def _nnx_names(model) -> dict[int, str]:
    """id(module) -> dotted path; ``nnx.Sequential``'s ``layers`` segment dropped."""
    from flax import nnx

    modules = dict(nnx.iter_modules(model))
    names = {}
    for path, sub in modules.items():
        parts = []
        for i, part in enumerate(path):
            if part == "layers" and isinstance(modules.get(path[:i]), nnx.Sequential):
                continue
            parts.append(str(part))
        names.setdefault(id(sub), ".".join(parts) or ROOT)
    return names


def _record_jax(model, batch, jax_fn) -> tuple[_Recorder, list[str]]:
    from flax import nnx

    recorder = _Recorder(_jax_to_numpy)
    names = _nnx_names(model)
    active: set[int] = set()
    patched = []

    def wrap(original):
        def __call__(self, *args, **kwargs):
            name = names.get(id(self))
            # A subclass's __call__ calling super().__call__ reaches a second wrapper: record once.
            if name is None or id(self) in active:
                return original(self, *args, **kwargs)
            active.add(id(self))
            call = recorder.enter(name, args, kwargs)
            try:
                output = original(self, *args, **kwargs)
                recorder.leave(call, output)
            finally:
                recorder.pop()
                active.discard(id(self))
            return output

        return __call__

    # Containers (nnx.List, nnx.Dict) have no __call__ of their own to wrap.
    classes = [
        cls
        for cls in dict.fromkeys(type(m) for _, m in nnx.iter_modules(model))
        if any("__call__" in c.__dict__ for c in cls.__mro__[:-1])
    ]
    try:
        for cls in classes:
            patched.append((cls, cls.__dict__.get("__call__")))
            cls.__call__ = wrap(cls.__call__)
        jax_fn(model, batch)
    finally:
        for cls, own in reversed(patched):
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own
    return recorder, sorted(set(names.values()))


def _convert_batch(batch, convert):
    if isinstance(batch, Mapping):
        return {k: _convert_batch(v, convert) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_convert_batch(v, convert) for v in batch)
    return convert(batch)


def _default_call(model, batch):
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _first_divergence(calls: Sequence[_Call], failing: set[tuple[str, int]], inputs_bad):
    def fails(call: _Call | None) -> bool:
        return call is not None and (call.name, call.index) in failing

    def culprit(call: _Call) -> str:
        for child in call.children:
            if fails(child):
                if inputs_bad(child):  # the parent's own code made the child's input differ
                    return call.name
                return culprit(child)
        return call.name

    # Normally the root call fails first; a failing call under a passing parent (a shape
    # mismatch the parent's output does not show) starts a walk of its own.
    for call in calls:
        if fails(call) and not fails(call.parent):
            return culprit(call)
    return None


def diff_layers(
    torch_module,
    jax_model,
    batch,
    *,
    atol: float = OUTPUT_ATOL,
    layout: str = "NCHW",
    call: tuple[Callable, Callable] | None = None,
) -> LayerDiffReport:
    """Compare every submodule's output of a torch module and its Flax NNX port.

    The torch module runs in eval mode without gradients (each submodule's training flag is
    restored afterwards); the NNX model runs as it is, so put it in eval mode first
    (``model.eval()``) when it has dropout or batch norm. Matmuls run at full float32 precision
    on both sides (TF32 off in torch, ``jax_default_matmul_precision="highest"``), restored
    afterwards. The NNX model must run eagerly (not under ``nnx.jit``) for its activations to be
    recorded.

    Args:
        torch_module: the reference ``torch.nn.Module``.
        jax_model: the ``flax.nnx.Module`` port, with the same attribute names.
        batch: what both models' ``__call__`` take: a dict of arrays (passed as one argument),
            a tuple of arrays (passed as positional arguments) or one array; numpy arrays are
            converted to torch tensors and jax arrays.
        atol: max-abs bound on each module's output (``core.parity.OUTPUT_ATOL`` by default).
        layout: the NNX side's layout of 4-D activations: "NCHW" (as torch) or "NHWC" (a conv
            port in Flax's native layout; its 4-D outputs are transposed before comparing).
        call: ``(torch_fn, jax_fn)``, each ``fn(model, converted_batch)``, to call the models
            differently (a method other than ``__call__``, keyword arguments, an NHWC input).

    Returns:
        A :class:`LayerDiffReport`: ``print(report)`` shows the table, ``report.ok`` says
        whether every compared module agrees and ``report.first_divergence`` names the module
        to look at first.
    """
    from mlperf_tutor.frameworks import require

    require("mlperf_tutor.parity.diff_layers", "torch", "jax")
    import jax
    import torch

    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    torch_fn, jax_fn = call or (_default_call, _default_call)
    device = next((p.device for p in torch_module.parameters()), torch.device("cpu"))

    def to_torch(x):
        return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device)

    def to_jax(x):
        return jax.numpy.asarray(_torch_to_numpy(x) if isinstance(x, torch.Tensor) else x)

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        ref = _record_torch(torch_module, _convert_batch(batch, to_torch), torch_fn)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        torch.set_float32_matmul_precision(matmul_precision)
    with jax.default_matmul_precision("highest"):
        port, jax_names = _record_jax(jax_model, _convert_batch(batch, to_jax), jax_fn)

    classes = {name or ROOT: type(m).__name__ for name, m in torch_module.named_modules()}
    rows, failing, input_state = [], set(), {}
    for t_call in ref.calls:
        depth, up = 0, t_call.parent
        while up is not None:
            depth, up = depth + 1, up.parent
        shapes = tuple(a.shape for _, a in t_call.outputs or [])
        shape = shapes[0] if len(shapes) == 1 else shapes
        j_calls = port.by_name.get(t_call.name, [])
        inputs_ok = max_abs = rel = None
        if t_call.name not in jax_names:
            status = MISSING
        elif t_call.index >= len(j_calls) or j_calls[t_call.index].outputs is None:
            status = NOT_CALLED
        else:
            j_call = j_calls[t_call.index]
            max_abs, rel, status = _compare(t_call.outputs, j_call.outputs, layout, atol)
            in_abs, _, in_status = _compare(t_call.inputs, j_call.inputs, layout, atol)
            inputs_ok = None if in_abs is None else in_status == OK
        key = (t_call.name, t_call.index)
        input_state[key] = inputs_ok
        row = LayerDiff(
            t_call.name,
            t_call.index,
            classes.get(t_call.name, "?"),
            depth,
            shape,
            max_abs,
            rel,
            inputs_ok,
            status,
        )
        if not row.ok:
            failing.add(key)
        rows.append(row)

    first = _first_divergence(ref.calls, failing, lambda c: input_state[(c.name, c.index)] is False)
    torch_names = set(classes)
    unmatched = sorted({c.name for c in port.calls} - torch_names)
    return LayerDiffReport(rows, atol, first, unmatched)

"""The op table covers the core ATen opset, and each op computes what PyTorch computes.

Every core op (``torch.Tag.core``) is translated or excluded for a stated reason; each op that
an OpInfo of PyTorch's own test database (``op_db``) reaches is run on a few of its samples,
traced to core ATen as ``run_decompositions()`` does, by the interpreter's op table and compared
with PyTorch's eager result (float32 on CPU); the core ops no OpInfo reaches (the backward ops)
are compared with PyTorch's kernel on hand-written inputs.
"""

from __future__ import annotations

import operator
import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.requires("torch", "jax")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402
from torch.fx.node import map_arg  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

from mlperf_tutor import frameworks  # noqa: E402
from mlperf_tutor.migrate import interpreter  # noqa: E402
from mlperf_tutor.migrate.aten_coverage import (  # noqa: E402
    EXCLUDED,
    HAND_TESTED,
    OPINFO,
    OPINFO_UNDECOMPOSED,
    core_ops,
    coverage,
    is_random,
)
from mlperf_tutor.migrate.aten_ops import CHECKS, OPS, RANDOM_OPS, jax_dtype  # noqa: E402
from mlperf_tutor.migrate.export import KEEP  # noqa: E402

frameworks.get("jax").pin_precision()
frameworks.get("torch").pin_precision()

# PyTorch's OpInfo database needs expecttest (a test dependency of PyTorch's own suite, pinned
# in requirements.txt). Importing it freezes torch.backends' global flags (its common_utils calls
# torch.backends.disable_global_flags()), after which every later pin_precision() in this test
# process would raise; they are unfrozen again.
_FROZEN = torch.backends.flags_frozen()
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

if not _FROZEN:  # the flag lives in torch/backends/__init__.py's globals (torch has no setter)
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    assert not torch.backends.flags_frozen()

SAMPLES = 3  # traced samples per OpInfo (the first ones its sample_inputs gives)
RTOL, ATOL = 1e-4, 1e-5  # float32: a few ulps of the result's scale, or of 1 near zero

# The decompositions translate() runs (torch.export's default table less the ops it keeps).
DECOMPOSITIONS = torch.export.default_decompositions()
for _op in KEEP:
    DECOMPOSITIONS.pop(_op, None)


def opinfo_name(info) -> str:
    return info.name + (f".{info.variant_test_name}" if info.variant_test_name else "")


OPINFOS = {opinfo_name(info): info for info in op_db}


# --- tracing an OpInfo sample to core ATen and running it through the op table -------------


def _dtype(info) -> torch.dtype | None:
    supported = info.supported_dtypes("cpu")
    return next((d for d in (torch.float32, torch.int64, torch.bool) if d in supported), None)


def _trace(info, sample, decompose: bool = True):
    """(graph module, tensor inputs, eager function) of one sample, in core ATen (or in the
    ATen ops the sample dispatches to, without ``decompose``)."""
    leaves, spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def fn(*tensors):
        full = list(leaves)
        for i, t in zip(where, tensors, strict=True):
            full[i] = t
        x, args, kwargs = pytree.tree_unflatten(full, spec)
        return info.op(x, *args, **kwargs)

    tensors = [leaves[i] for i in where]
    # In-place ops become functional ones (as torch.export makes them); with ``decompose``
    # views become copies too, as core ATen's decompositions expect; without, views stay.
    remove = "mutations_and_views" if decompose else "mutations"
    functional = torch.func.functionalize(fn, remove=remove)
    table = DECOMPOSITIONS if decompose else {}
    graph = make_fx(functional, decomposition_table=table, tracing_mode="real")(*tensors)
    graph.graph.eliminate_dead_code()  # as in an exported graph (unused pooling indices)
    return graph, tensors, fn


def _graph_ops(graph) -> set[str]:
    return {
        interpreter.op_name(n.target)
        for n in graph.graph.nodes
        if n.op == "call_function" and n.target is not operator.getitem
    }


def _refused(graph) -> list[str]:
    """Ops the interpreter would refuse: untranslated, random, or arguments a check rejects."""
    out = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        name = interpreter.op_name(node.target)
        if name not in OPS or name in RANDOM_OPS or (name in CHECKS and CHECKS[name](node)):
            out.append(name)
    return out


def _run(graph, tensors):
    """The graph evaluated node by node with the op table, as the interpreter does."""
    env, inputs = {}, iter(tensors)
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            env[node] = jnp.asarray(next(inputs).numpy())
        elif node.op == "get_attr":
            env[node] = jnp.asarray(getattr(graph, node.target).numpy())
        elif node.op == "call_function":
            args = map_arg(node.args, env.__getitem__)
            kwargs = map_arg(node.kwargs, env.__getitem__)
            if node.target is operator.getitem:
                value = args[0][args[1]]
            else:
                value = OPS[interpreter.op_name(node.target)](*args, **kwargs)
            env[node] = interpreter._conform(value, node)
        elif node.op == "output":
            return map_arg(node.args[0], env.__getitem__)


# OpInfos whose outputs are uninitialised memory in PyTorch: only shapes and dtypes compare.
UNINITIALISED = {"empty", "empty_like", "empty_permuted", "empty_strided", "new_empty"}
UNINITIALISED |= {"new_empty_strided"}


def _mismatch(want, got, values: bool = True) -> str | None:
    want, got = pytree.tree_leaves(want), pytree.tree_leaves(got)
    if len(want) != len(got):
        return f"{len(got)} outputs, PyTorch {len(want)}"
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if not isinstance(w, torch.Tensor):
            continue
        w, g = w.detach().resolve_conj().numpy(), np.asarray(g)
        if w.shape != g.shape:
            return f"output {i}: shape {g.shape}, PyTorch {w.shape}"
        if not values:
            if jax_dtype(w.dtype) != g.dtype:
                return f"output {i}: dtype {g.dtype}, PyTorch {w.dtype}"
            continue
        kind = np.complex128 if np.iscomplexobj(w) else np.float64
        w, g = w.astype(kind), g.astype(kind)
        if not np.allclose(g, w, rtol=RTOL, atol=ATOL, equal_nan=True):
            return f"output {i}: max-abs difference {np.nanmax(np.abs(g - w)):.3g}"
    return None


def check_opinfo(info, decompose: bool = True, samples: int = SAMPLES):
    """Run the first ``samples`` traceable samples of ``info``; (the ops of those that ran,
    mismatch messages). Samples whose graph the interpreter would refuse are not run."""
    dtype = _dtype(info)
    seen, problems, traced = set(), [], 0
    if dtype is None:
        return seen, problems
    for sample in info.sample_inputs("cpu", dtype, requires_grad=False):
        if traced == samples:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph, tensors, fn = _trace(info, sample, decompose)
                want = fn(*(t.clone() for t in tensors))
        except Exception:  # samples that PyTorch itself rejects, or make_fx cannot trace
            continue
        traced += 1
        if _refused(graph):
            continue
        try:
            problem = _mismatch(want, _run(graph, tensors), opinfo_name(info) not in UNINITIALISED)
        except Exception as error:
            problem = f"{type(error).__name__}: {error}"
        if problem:
            problems.append(f"sample {traced} ({sorted(_graph_ops(graph))}): {problem}")
        else:
            seen |= _graph_ops(graph)
    return seen, problems


# --- the tests -------------------------------------------------------------------------------


def test_every_core_op_is_translated_or_excluded():
    core = set(core_ops())
    untranslated = sorted(
        op for op in core if op not in OPS and op not in EXCLUDED and not is_random(op)
    )
    assert untranslated == [], "core ATen ops without a translation or a listed exclusion"
    assert set(EXCLUDED) <= core, "exclusions that are no longer core ops"
    assert not set(EXCLUDED) & set(OPS), "exclusions that are translated after all"
    assert "aten.empty_permuted.default" in OPS  # not core, but MobileNetV3's graphs have it


OPINFO_RUNS = [(name, True) for name in sorted(set(OPINFO.values()))]
OPINFO_RUNS += [(name, False) for name in sorted(set(OPINFO_UNDECOMPOSED.values()))]


@pytest.mark.parametrize(
    ("name", "decompose"),
    OPINFO_RUNS,
    ids=[f"{n}-{'core' if d else 'undecomposed'}" for n, d in OPINFO_RUNS],
)
def test_opinfo_samples_match_torch(name, decompose):
    seen, problems = check_opinfo(OPINFOS[name], decompose)
    assert problems == []
    table = OPINFO if decompose else OPINFO_UNDECOMPOSED
    reached = {op for op, owner in table.items() if owner == name}
    assert reached <= seen, f"{name}'s samples no longer reach {sorted(reached - seen)}"


def test_every_translated_core_op_is_tested():
    tested = {*OPINFO, *OPINFO_UNDECOMPOSED, *HAND_TESTED}
    untested = [op for op in core_ops() if op in OPS and not is_random(op) and op not in tested]
    assert untested == []


def test_coverage_table_rows():
    rows = {row["op"]: row for row in coverage()}
    assert set(rows) == {*core_ops(), "aten.empty_permuted.default"}
    assert rows["aten.add.Tensor"]["covered"] and rows["aten.add.Tensor"]["tested"]
    assert rows["aten.convolution_backward.default"]["tested"] == "hand-written inputs"
    assert not rows["aten.nonzero.default"]["covered"]
    assert "output shape" in rows["aten.nonzero.default"]["note"]
    assert rows["aten.empty_permuted.default"]["covered"]
    for op in (*OPINFO, *OPINFO_UNDECOMPOSED, *HAND_TESTED):
        assert rows[op]["covered"] and rows[op]["tested"], op


# --- core ops no OpInfo reaches: PyTorch's own kernel on hand-written inputs ----------------


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _max_pool_backward_args():
    x = _randn(2, 3, 6, 6)
    _, indices = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
    return (_randn(2, 3, 3, 3, seed=1), x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)


def _layer_norm_backward_args():
    x, w, b = _randn(4, 6), _randn(6, seed=1), _randn(6, seed=2)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [6], w, b, 1e-5)
    return (_randn(4, 6, seed=3), x, [6], mean, rstd, w, b, [True, True, True])


def _group_norm_backward_args():
    x, w, b = _randn(2, 6, 4, 4), _randn(6, seed=1), _randn(6, seed=2)
    _, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, 2, 6, 16, 3, 1e-5)
    return (_randn(2, 6, 4, 4, seed=3), x, mean, rstd, w, 2, 6, 16, 3, [True, True, True])


def _indices(*shape, high=10):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(4))


HAND_CASES = {
    "aten.convolution_backward.default": lambda: (
        _randn(2, 6, 4, 4, seed=1),
        _randn(2, 4, 8, 8),
        _randn(6, 2, 3, 3, seed=2),
        [6],
        [2, 2],
        [1, 1],
        [1, 1],
        False,
        [0, 0],
        2,
        [True, True, True],
    ),
    "aten.avg_pool2d_backward.default": lambda: (
        _randn(2, 3, 4, 4, seed=1),
        _randn(2, 3, 7, 7),
        [3, 3],
        [2, 2],
        [1, 1],
        False,
        True,
        None,
    ),
    "aten._adaptive_avg_pool2d_backward.default": lambda: (
        _randn(2, 3, 2, 3, seed=1),
        _randn(2, 3, 5, 7),
    ),
    "aten.max_pool2d_with_indices_backward.default": _max_pool_backward_args,
    "aten.embedding_dense_backward.default": lambda: (_randn(4, 5, 3), _indices(4, 5), 10, 2, True),
    "aten.native_layer_norm_backward.default": _layer_norm_backward_args,
    "aten.native_group_norm_backward.default": _group_norm_backward_args,
    "aten._native_batch_norm_legit.default": lambda: (
        _randn(2, 3, 4, 4),
        _randn(3, seed=1),
        _randn(3, seed=2),
        _randn(3, seed=3),
        _randn(3, seed=4).abs() + 0.5,
        False,
        0.1,
        1e-5,
    ),
    "aten._local_scalar_dense.default": lambda: (_randn(1),),
    "aten.sym_size.int": lambda: (_randn(2, 3), 1),
    "aten.sym_numel.default": lambda: (_randn(2, 3),),
    "aten.col2im.default": lambda: (_randn(2, 12, 12), [4, 5], [2, 2], [1, 1], [1, 0], [2, 1]),
    "aten._embedding_bag.default": lambda: (
        _randn(10, 3),
        _indices(8),
        torch.tensor([0, 3, 3]),
        False,
        1,
    ),
    "aten._native_batch_norm_legit.no_stats": lambda: (
        _randn(2, 3, 4, 4),
        _randn(3, seed=1),
        _randn(3, seed=2),
        True,
        0.1,
        1e-5,
    ),
    "aten._native_batch_norm_legit_no_training.default": lambda: (
        _randn(2, 3, 4, 4),
        _randn(3, seed=1),
        _randn(3, seed=2),
        _randn(3, seed=3),
        _randn(3, seed=4).abs() + 0.5,
        0.1,
        1e-5,
    ),
    "aten.adaptive_avg_pool1d.default": lambda: (_randn(2, 3, 7), [3]),
    "aten.avg_pool1d.default": lambda: (_randn(2, 3, 9), [3], [2], [1], True, False),
    "aten.bitwise_and.Scalar": lambda: (_indices(4, 5, high=64), 37),
    "aten.bitwise_or.Scalar": lambda: (_indices(4, 5, high=64), 37),
    "aten.bitwise_xor.Scalar": lambda: (_indices(4, 5, high=64), 37),
    "aten.copy.default": lambda: (_randn(3, 4), _randn(4, seed=1)),
    "aten.div.Scalar_mode": lambda: (_randn(3, 4) * 5, 1.5),
    "aten.reflection_pad2d.default": lambda: (_randn(2, 3, 4, 5), [1, 2, 3, -1]),
    "aten.reflection_pad3d.default": lambda: (_randn(1, 2, 3, 4, 5), [1, 2, 2, 0, 1, 1]),
    "aten.replication_pad3d.default": lambda: (_randn(1, 2, 3, 4, 5), [1, 2, 0, 3, -1, 2]),
    "aten.scatter.value": lambda: (_randn(4, 5), 1, _indices(4, 3, high=5), 2.5),
    "aten.sub.Scalar": lambda: (_randn(3, 4), 2.5, 0.5),
    "aten.upsample_bilinear2d.vec": lambda: (_randn(2, 3, 4, 5), None, False, [1.5, 2.0]),
    "aten.upsample_nearest2d.vec": lambda: (_randn(2, 3, 4, 5), [7, 9], None),
    "aten.var.dim": lambda: (_randn(3, 4, 5), [0, 2], False, True),
}
HAND_KWARGS = {"aten.div.Scalar_mode": {"rounding_mode": "floor"}}


@pytest.mark.parametrize("name", sorted(HAND_TESTED))
def test_hand_written_inputs_match_torch(name):
    args, kwargs = HAND_CASES[name](), HAND_KWARGS.get(name, {})
    _, base, overload = name.split(".")
    want = getattr(getattr(torch.ops.aten, base), overload)(*args, **kwargs)
    jax_args = pytree.tree_map(
        lambda a: jnp.asarray(a.numpy()) if isinstance(a, torch.Tensor) else a, args
    )
    got = OPS[name](*jax_args, **kwargs)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    if name == "aten._native_batch_norm_legit.default":  # eval: only the output is defined
        want, got = want[:1], got[:1]
    assert [w is None for w in want] == [g is None for g in got]
    for w, g in zip(want, got, strict=True):
        if w is not None:
            w = w.numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
            np.testing.assert_allclose(np.asarray(g), w, rtol=RTOL, atol=ATOL)


def test_hand_cases_cover_the_hand_tested_ops():
    assert set(HAND_CASES) == set(HAND_TESTED)


class _ChannelsLastBlock(torch.nn.Module):
    """A conv-BN-hardswish block whose graph holds empty_permuted (as MobileNetV3's does): a
    fresh tensor like a permuted (channels-last) activation."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        h = torch.nn.functional.hardswish(self.bn(self.conv(x)))
        ones = torch.empty_like(h.permute(0, 2, 3, 1)).fill_(1.0)
        return h.mean() + (ones * h.permute(0, 2, 3, 1)).sum()


def test_empty_permuted_in_an_exported_model():
    from mlperf_tutor.migrate.export import translate

    model = _ChannelsLastBlock()
    batch = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    translation = translate(model, lambda m, b: m(b["x"]), batch)
    assert "aten.empty_permuted.default" in translation.ops()
    loss, _ = translation.apply(translation.params, translation.buffers, translation.frozen, batch)
    want = model(torch.from_numpy(batch["x"])).item()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)

"""DLRM-DCNv2 in JAX (Flax NNX): the forward against the float64 numpy reference
(``numpy_reference.dlrm``), canonical names, sparse embedding gradients and Adagrad updates
through the adapter, and the native gather-and-sum embedding bags."""

from __future__ import annotations

import numpy as np
import numpy_reference as ref
import pytest

pytestmark = pytest.mark.requires("jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mlperf_tutor import frameworks  # noqa: E402
from mlperf_tutor.core.parity import OUTPUT_ATOL  # noqa: E402
from mlperf_tutor.workloads.dlrm import WORKLOAD as WL  # noqa: E402
from mlperf_tutor.workloads.dlrm import jax_model as dlrm_jax  # noqa: E402

fj = frameworks.get("jax")
CFG = WL.config("tiny")
B = 16
FLOAT64_ATOL = 1e-10


@pytest.fixture(scope="module", autouse=True)
def _pinned():
    fj.pin_precision()


# --- helpers ----------------------------------------------------------------------------------
def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def to_float64(model: nnx.Module) -> None:
    """Cast every parameter of ``model`` to float64 (call inside ``jax.enable_x64``)."""
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(var.get_value(), jnp.float64))


def touched_rows(batches, cfg=CFG) -> list[np.ndarray]:
    """Per table, the sorted row ids that any bag of ``batches`` holds."""
    starts = np.cumsum([0, *cfg.multi_hot_sizes])
    return [
        np.unique(np.concatenate([b["sparse"][:, starts[f] : starts[f + 1]] for b in batches]))
        for f in range(cfg.num_tables)
    ]


def equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, custom_jvp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
                if hasattr(sub, "eqns"):
                    yield from equations(sub)


@nnx.jit
def _pooled(model, sparse):
    return model.pooled(sparse)


def untouched(rows: int, touched: np.ndarray) -> np.ndarray:
    return np.setdiff1d(np.arange(rows), touched)


@pytest.fixture(scope="module")
def case():
    """Random weights (float32), a batch with both labels and its float64 reference outputs."""
    tree = WL.init_canonical(CFG, seed=3)
    batch = WL.synthetic_batch(CFG, batch_size=B, seed=7)
    assert 0 < batch["labels"].sum() < B
    want = ref.dlrm({k: v.astype(np.float64) for k, v in tree.items()}, CFG, batch)
    return {"tree": tree, "batch": batch, "want": want, "model": WL.build("jax", CFG, tree)}


# --- the forward ------------------------------------------------------------------------------
def test_forward_matches_numpy_in_float64(case):
    with jax.enable_x64(True):
        model = dlrm_jax.build(CFG)
        to_float64(model)
        fj.load_canonical(model, {k: v.astype(np.float64) for k, v in case["tree"].items()})
        got = fj.forward(model, case["batch"])
    assert got["logits"].dtype == np.float64 and got["loss"].dtype == np.float64
    assert got["logits"].shape == (B,)
    assert max_abs(got["logits"], case["want"]["logits"]) <= FLOAT64_ATOL
    assert max_abs(got["loss"], case["want"]["loss"]) <= FLOAT64_ATOL


def test_forward_matches_numpy_in_float32(case):
    got = fj.forward(case["model"], case["batch"])
    assert got["logits"].dtype == np.float32 and got["loss"].dtype == np.float32
    assert max_abs(got["logits"], case["want"]["logits"]) <= OUTPUT_ATOL
    assert max_abs(got["loss"], case["want"]["loss"]) <= OUTPUT_ATOL
    # Without labels (evaluation): logits only, the same ones.
    unlabelled = {k: v for k, v in case["batch"].items() if k != "labels"}
    logits_only = WL.forward("jax", case["model"], unlabelled)
    assert set(logits_only) == {"logits"}
    assert np.array_equal(logits_only["logits"], got["logits"])


def test_every_feature_and_the_cross_layers_change_the_logits(case):
    """The concat order and the cross layers matter: perturbing one table or one cross layer
    moves the logits, in agreement with the reference."""
    for name in (
        "embedding_bags.25.weight",
        "embedding_bags.0.weight",
        "interaction.layers.2.w.bias",
        "bottom_mlp.layers.0.weight",
    ):
        tree = dict(case["tree"], **{name: case["tree"][name] + np.float32(0.5)})
        got = fj.forward(WL.build("jax", CFG, tree), case["batch"])["logits"]
        want = ref.dlrm({k: v.astype(np.float64) for k, v in tree.items()}, CFG, case["batch"])
        assert max_abs(got, case["want"]["logits"]) > 1e-3, name
        assert max_abs(got, want["logits"]) <= OUTPUT_ATOL, name


# --- names and gradients ----------------------------------------------------------------------
def test_tables_mlps_and_cross_layers_have_the_reference_structure():
    model = dlrm_jax.build(CFG)
    assert len(model.embedding_bags) == CFG.num_tables == 26
    assert [len(model.bottom_mlp.layers), len(model.top_mlp.layers)] == [3, 3]
    assert model.bottom_mlp.relu_last and not model.top_mlp.relu_last
    assert model.interaction.layers[0].v.bias is None  # v has no bias, w has one


def test_loss_and_grads_give_sparse_embedding_gradients(case):
    loss, grads = fj.loss_and_grads(case["model"], case["batch"])
    assert abs(loss - case["want"]["loss"]) <= OUTPUT_ATOL
    specs = WL.canonical_specs(CFG)
    assert {k: (g.shape, g.dtype.name) for k, g in grads.items()} == specs
    for name, g in grads.items():
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name
    some_untouched = 0
    for f, rows in enumerate(touched_rows([case["batch"]])):
        g = grads[f"embedding_bags.{f}.weight"]
        idle = untouched(len(g), rows)
        some_untouched += len(idle)
        assert np.all(g[idle] == 0.0), f
        assert np.all(np.abs(g[rows]).max(axis=1) > 0), f
    assert some_untouched > 100  # the tiny tables are far from fully touched by one batch


def test_adagrad_steps_leave_untouched_rows_bit_identical(case):
    model = WL.build("jax", CFG, case["tree"])
    optimizer = fj.make_optimizer(*WL.optimizer(CFG), model)
    batches = [WL.synthetic_batch(CFG, batch_size=B, seed=100 + s) for s in range(10)]
    losses = [fj.train_step(model, optimizer, batches[0])]
    traced = optimizer.trace_count
    losses += [fj.train_step(model, optimizer, batch) for batch in batches[1:]]
    assert np.isfinite(losses).all() and optimizer.trace_count == traced  # one compiled step
    after = fj.to_canonical(model)
    first_rows, some_untouched = touched_rows(batches[:1]), 0
    for f, rows in enumerate(touched_rows(batches)):
        name = f"embedding_bags.{f}.weight"
        before, now = case["tree"][name], after[name]
        idle = untouched(len(before), rows)
        some_untouched += len(idle)
        assert np.array_equal(now[idle], before[idle]), name
        # Every row of the first batch moved (later batches can hit samples whose ReLUs are
        # all off, which give their rows no gradient).
        first = first_rows[f]
        assert np.all((now[first] != before[first]).any(axis=1)), name
    assert some_untouched > 100
    name = "top_mlp.layers.2.weight"
    assert not np.array_equal(after[name], case["tree"][name])


# --- the native sparse path -------------------------------------------------------------------
def test_tables_are_nnx_embed_and_the_forward_gathers_each_table_once(case):
    model = case["model"]
    assert all(isinstance(embed, nnx.Embed) for embed in model.embedding_bags)
    graphdef, state = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in case["batch"].items()}
    jaxpr = jax.make_jaxpr(lambda s, b: nnx.merge(graphdef, s)(b))(state, batch).jaxpr
    gathered = [
        tuple(eqn.invars[0].aval.shape)
        for eqn in equations(jaxpr)
        if eqn.primitive.name == "gather"
    ]
    assert sorted(gathered) == sorted((rows, CFG.embedding_dim) for rows in CFG.table_sizes)


def test_a_bag_of_one_index_is_a_row_lookup():
    cfg = WL.config("tiny", multi_hot_sizes=(1,) * 26)
    tree = WL.init_canonical(cfg, seed=5)
    model = WL.build("jax", cfg, tree)
    sparse = WL.synthetic_batch(cfg, batch_size=B, seed=2)["sparse"]
    assert sparse.shape == (B, 26)
    pooled = _pooled(model, jnp.asarray(sparse))
    for f, got in enumerate(pooled):
        assert np.array_equal(np.asarray(got), tree[f"embedding_bags.{f}.weight"][sparse[:, f]])


def test_multi_hot_bags_sum_their_rows(case):
    sparse = case["batch"]["sparse"]
    starts = np.cumsum([0, *CFG.multi_hot_sizes])
    pooled = _pooled(case["model"], jnp.asarray(sparse))
    for f, got in enumerate(pooled):
        table = case["tree"][f"embedding_bags.{f}.weight"].astype(np.float64)
        want = table[sparse[:, starts[f] : starts[f + 1]]].sum(axis=1)  # (B, E)
        assert got.shape == (B, CFG.embedding_dim)
        assert max_abs(got, want) <= 1e-6, f
    # Repeated ids in one bag count once each.
    table = jnp.arange(12.0).reshape(4, 3)
    bag = jnp.asarray([[1, 1, 3], [0, 2, 2]])
    assert np.array_equal(dlrm_jax.bag_sum(table, bag), [[15.0, 18.0, 21.0], [12.0, 15.0, 18.0]])

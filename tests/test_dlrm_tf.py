"""DLRM-DCNv2 in TensorFlow (Keras 3): the model against ``numpy_reference.dlrm`` in float64 and
float32, canonical names, sparse embedding gradients (``tf.IndexedSlices``) and Adagrad through
the adapter leaving the rows no batch touched bit-identical."""

from __future__ import annotations

import numpy as np
import numpy_reference as ref
import pytest

pytestmark = pytest.mark.requires("tf")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from mlperf_tutor.frameworks import tf as adapter  # noqa: E402
from mlperf_tutor.workloads.dlrm import WORKLOAD as WL  # noqa: E402
from mlperf_tutor.workloads.dlrm import tf_model  # noqa: E402
from mlperf_tutor.workloads.dlrm.data import bag_offsets  # noqa: E402

FLOAT64_ATOL = 1e-10
FLOAT32_ATOL = 1e-5
BATCH = 16


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def touched_rows(cfg, batches) -> list[np.ndarray]:
    """Per table, a boolean mask of the rows that some bag of ``batches`` holds."""
    offsets = bag_offsets(cfg.multi_hot_sizes)
    masks = [np.zeros(rows, bool) for rows in cfg.table_sizes]
    for batch in batches:
        for f, mask in enumerate(masks):
            mask[batch["sparse"][:, offsets[f] : offsets[f + 1]].ravel()] = True
    return masks


@pytest.fixture(scope="module")
def run():
    """Tiny config, float64 weights, a batch and the numpy reference's outputs; each model (float64,
    float32) is built once."""
    cfg = WL.config("tiny")
    tree = {k: v.astype(np.float64) for k, v in WL.init_canonical(cfg, seed=3).items()}
    batch = WL.synthetic_batch(cfg, batch_size=BATCH, seed=4)
    models = {"float64": tf_model.build(cfg, dtype="float64"), "float32": tf_model.build(cfg)}
    adapter.load_canonical(models["float64"], tree)
    adapter.load_canonical(models["float32"], {k: v.astype(np.float32) for k, v in tree.items()})
    want = ref.dlrm(tree, cfg, batch)
    return {"cfg": cfg, "tree": tree, "batch": batch, "want": want, **models}


# --- forward --------------------------------------------------------------------------------
def test_forward_matches_numpy_in_float64(run):
    out = WL.forward("tf", run["float64"], run["batch"])
    assert out["logits"].shape == (BATCH,) and out["logits"].dtype == np.float64
    assert max_abs(out["logits"], run["want"]["logits"]) <= FLOAT64_ATOL
    assert out["loss"].dtype == np.float64
    assert abs(float(out["loss"]) - run["want"]["loss"]) <= FLOAT64_ATOL


def test_forward_matches_numpy_in_float32(run):
    out = WL.forward("tf", run["float32"], run["batch"])
    assert out["logits"].dtype == np.float32 and out["loss"].dtype == np.float32
    assert max_abs(out["logits"], run["want"]["logits"]) <= FLOAT32_ATOL
    assert abs(float(out["loss"]) - run["want"]["loss"]) <= FLOAT32_ATOL


def test_batch_without_labels_gives_logits_only(run):
    batch = {k: v for k, v in run["batch"].items() if k != "labels"}
    out = WL.forward("tf", run["float64"], batch)
    assert set(out) == {"logits"}
    assert max_abs(out["logits"], run["want"]["logits"]) <= FLOAT64_ATOL


# --- names and the native sparse path -------------------------------------------------------
def test_layers_have_canonical_names_and_the_reference_structure(run):
    cfg, model = run["cfg"], run["float32"]
    assert [layer.name for layer in model.embedding_bags] == [
        f"embedding_bags.{i}" for i in range(cfg.num_tables)
    ]
    assert model.interaction.layers[2].w.name == "w" and model.top_mlp.layers[1].name == "layers.1"
    assert model.bottom_mlp.relu_last and not model.top_mlp.relu_last
    assert model.interaction.layers[0].v.bias is None


def test_embedding_bags_are_keras_embeddings_with_sparse_gradients(run):
    model, batch = run["float64"], run["batch"]
    assert all(isinstance(t, keras.layers.Embedding) for t in model.embedding_bags)
    tables = [t.embeddings for t in model.embedding_bags]
    with tf.GradientTape() as tape:
        loss = model({k: tf.constant(v) for k, v in batch.items()})["loss"]
    grads = tape.gradient(loss, tables)
    offsets = bag_offsets(run["cfg"].multi_hot_sizes)
    for f, grad in enumerate(grads):
        # One slice per distinct id of the feature's bags, not a dense (rows, E) gradient.
        assert isinstance(grad, tf.IndexedSlices)
        ids = np.unique(batch["sparse"][:, offsets[f] : offsets[f + 1]])
        assert sorted(adapter.to_numpy(grad.indices).tolist()) == ids.tolist()


def test_a_bag_of_one_index_is_a_row_lookup_and_a_bag_sums_its_rows(run):
    table = run["float64"].embedding_bags[9]
    weight = run["tree"]["embedding_bags.9.weight"]
    ids = np.array([[5], [0], [100], [5]], np.int32)
    one = adapter.to_numpy(tf_model.embedding_bag(table, tf.constant(ids)))
    np.testing.assert_array_equal(one, weight[ids[:, 0]])
    bags = np.array([[3, 3, 7], [0, 1, 2]], np.int32)  # repeats count twice
    summed = adapter.to_numpy(tf_model.embedding_bag(table, tf.constant(bags)))
    assert max_abs(summed, weight[bags].sum(axis=1)) <= FLOAT64_ATOL


# --- gradients ------------------------------------------------------------------------------
def test_loss_and_grads_cover_every_name_and_only_touched_rows(run):
    cfg, batch = run["cfg"], run["batch"]
    loss, grads = adapter.loss_and_grads(run["float64"], batch, train=False)
    assert loss == pytest.approx(run["want"]["loss"], abs=FLOAT64_ATOL)
    assert {k: v.shape for k, v in grads.items()} == {
        k: shape for k, (shape, _) in WL.canonical_specs(cfg).items()
    }
    assert all(np.abs(g).any() for g in grads.values())
    for f, mask in enumerate(touched_rows(cfg, [batch])):
        grad = grads[f"embedding_bags.{f}.weight"]
        assert not grad[~mask].any()  # exactly zero
        assert np.abs(grad[mask]).sum(axis=1).all()


def test_embedding_and_cross_gradients_match_finite_differences(run):
    _, grads = adapter.loss_and_grads(run["float64"], run["batch"], train=False)
    row = int(run["batch"]["sparse"][0, bag_offsets(run["cfg"].multi_hot_sizes)[20]])
    for name, index in [
        ("embedding_bags.20.weight", (row, 3)),
        ("interaction.layers.1.v.weight", (2, 5)),
        ("bottom_mlp.layers.0.bias", (1,)),
    ]:
        h, tree = 1e-6, dict(run["tree"])
        losses = []
        for sign in (1.0, -1.0):
            tree[name] = run["tree"][name].copy()
            tree[name][index] += sign * h
            losses.append(ref.dlrm(tree, run["cfg"], run["batch"])["loss"])
        numeric = (losses[0] - losses[1]) / (2 * h)
        assert grads[name][index] == pytest.approx(numeric, rel=1e-6, abs=1e-9), name


# --- Adagrad through the adapter -----------------------------------------------------------
def test_one_adagrad_step_applies_the_summed_sparse_gradient(run):
    cfg = run["cfg"]
    model = tf_model.build(cfg, dtype="float64")
    adapter.load_canonical(model, run["tree"])
    spec, schedule = WL.optimizer(cfg)
    _, grads = adapter.loss_and_grads(model, run["batch"], train=True)
    optimizer = adapter.make_optimizer(spec, schedule, model)
    adapter.train_step(model, optimizer, run["batch"])
    after = adapter.to_canonical(model)
    # torch.optim.Adagrad with accumulator 0: p - lr g / (sqrt(g^2) + eps), duplicates summed.
    for name in ("embedding_bags.0.weight", "embedding_bags.20.weight", "top_mlp.layers.0.weight"):
        p, g = run["tree"][name], grads[name]
        want = p - schedule.lr * g / (np.sqrt(g * g) + spec.eps)
        assert max_abs(after[name], want) <= 1e-12, name


def test_ten_adagrad_steps_leave_untouched_rows_bit_identical(run):
    cfg = run["cfg"]
    model = tf_model.build(cfg)
    initial = {k: v.astype(np.float32) for k, v in run["tree"].items()}
    adapter.load_canonical(model, initial)
    optimizer = adapter.make_optimizer(*WL.optimizer(cfg), model)
    batches = [WL.synthetic_batch(cfg, batch_size=BATCH, seed=10 + s) for s in range(10)]
    losses = [adapter.train_step(model, optimizer, b) for b in batches]
    assert np.isfinite(losses).all() and int(optimizer.native.iterations.numpy()) == 10
    after = adapter.to_canonical(model)
    masks = touched_rows(cfg, batches)
    assert any((~mask).any() for mask in masks)  # some rows are really left out
    state = optimizer.state_dict()
    # A row of a later batch may get an exactly zero gradient (a saturated sigmoid whose label
    # matches); every row of the first batch moves.
    for f, (mask, first) in enumerate(zip(masks, touched_rows(cfg, batches[:1]), strict=True)):
        name = f"embedding_bags.{f}.weight"
        np.testing.assert_array_equal(after[name][~mask], initial[name][~mask])
        assert (after[name][first] != initial[name][first]).any(axis=1).all(), name
        acc = state[f"sum/{name}"]
        assert not acc[~mask].any() and acc[first].any(axis=1).all()
    assert not np.array_equal(after["top_mlp.layers.2.bias"], initial["top_mlp.layers.2.bias"])

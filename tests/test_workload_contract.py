"""The workload contract: what every workload does, the same way, in every framework.

Adding a workload to this suite is one line: its name in ``WORKLOADS``. Each (workload,
framework) pair builds its tiny model once (module-scoped fixtures) and is checked for

- canonical weights: a default build exports ``init_canonical(cfg, seed=0)`` with exactly
  ``canonical_specs(cfg)``'s names, shapes and dtypes; loaded random weights come back
  bit-identical; the trainable names (LoRA: the adapters only) and ``param_count`` follow from
  the specs;
- the forward: the same output names, shapes and dtypes as PyTorch's;
- ``set_trainable``: any subset of the weights, then all of them, become the trainable names
  (training a frozen subset is test_adapter_contract's, on the toy workload);
- training: gradients for exactly the trainable names, reaching every weight matrix; frozen
  weights (LoRA's base) bit-identical after training; one optimizer slot per trained weight;
  training resumed from the canonical weights and optimizer state continuing bit-identically;
- inputs longer than ``max_positions`` refused with a ValueError naming it (workloads with
  positions);

and each workload for the parity command, ``info`` on its largest preset (nothing allocated) and
the convert command through every format. What is specific to a workload (reference numbers,
layers against numpy, Hugging Face models) stays in its own test files.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import tracemalloc

import numpy as np
import pytest
from checks import assert_bit_identical, random_tree

from mlperf_tutor import cli, convert, frameworks, workloads
from mlperf_tutor.core.checkpoint import tree_specs
from mlperf_tutor.layers.spec import is_adapter

WORKLOADS = ["bert", "dlrm_dcnv2", "gpt3", "gptj", "llama2_70b_lora", "stable_diffusion", "toy"]

# Each framework's tests need its extra only; PyTorch is also the reference of the forward test.
FRAMEWORKS = [pytest.param(f, marks=pytest.mark.requires(f)) for f in frameworks.NAMES]
EVERY_FRAMEWORK = pytest.mark.requires(*frameworks.NAMES)
# Workloads whose inputs are sequences with a position limit.
POSITIONAL = [w for w in WORKLOADS if hasattr(workloads.get(w).config("tiny"), "max_positions")]


def is_buffer(name: str) -> bool:
    """BatchNorm's running statistics: canonical names are PyTorch's, and these are buffers
    there (never trained, updated by the forward in train mode)."""
    return name.endswith(("running_mean", "running_var"))


def tiny(name: str):
    """(workload, its tiny config without dropout): runs compare bits, so nothing is random."""
    wl = workloads.get(name)
    return wl, wl.deterministic(wl.config("tiny"))


def random_weights(wl, cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights of the canonical specs (every value distinct, no zero-initialised layer:
    a transposed matrix or a lost adapter shows), variances kept positive."""
    specs = wl.canonical_specs(cfg)
    tree = random_tree({k: shape for k, (shape, _) in specs.items()}, seed)
    for name, value in tree.items():
        if name.endswith("running_var"):
            tree[name] = np.abs(value) + 0.5
    return {k: v.astype(specs[k][1]) for k, v in tree.items()}


def batch(wl, cfg, seed: int) -> dict[str, np.ndarray]:
    return wl.synthetic_batch(cfg, batch_size=2, seed=seed)  # the parity command's size


# --- fixtures: one build per (workload, framework) --------------------------------------------


@pytest.fixture(scope="module", params=WORKLOADS)
def workload(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=FRAMEWORKS)
def framework(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def case(workload, framework):
    """The tiny model in ``framework``: its export as built, then with random weights loaded."""
    wl, cfg = tiny(workload)
    adapter = frameworks.get(framework)
    model = wl.build(framework, cfg)
    built = adapter.to_canonical(model)
    tree = random_weights(wl, cfg, seed=1)
    adapter.load_canonical(model, tree)
    return {"wl": wl, "cfg": cfg, "adapter": adapter, "model": model, "built": built, "tree": tree}


@pytest.fixture(scope="module")
def torch_outputs(workload):
    """PyTorch's forward of every workload's random weights: the other frameworks' reference."""
    wl, cfg = tiny(workload)
    model = wl.build("torch", cfg, weights=random_weights(wl, cfg, seed=1))
    return wl.forward("torch", model, batch(wl, cfg, seed=2))


@pytest.fixture(scope="module")
def trained(workload, framework):
    """Training as built (LoRA: the adapters only): the gradients, one step, the canonical weights
    and optimizer state, a second step; then the saved weights and state loaded back into the
    model and optimizer, and the same second step again.

    One step before saving is enough: schedules that warm up from a learning rate of zero
    (bert, gpt3) move no weight on step 0 but fill the moments, and step 1 then uses both.
    Loading into the same objects keeps their compiled step (a fresh model retraces, which costs
    TensorFlow seconds per workload); anything the canonical state missed would still hold the
    second step's values and show. Resuming into fresh objects is test_adapter_contract's, for
    every optimizer on the toy workload.
    """
    wl, cfg = tiny(workload)
    adapter = frameworks.get(framework)
    tree = random_weights(wl, cfg, seed=3)
    model = wl.build(framework, cfg, weights=tree)
    trainable = adapter.trainable_names(model)
    loss, grads = adapter.loss_and_grads(model, batch(wl, cfg, seed=0))
    optimizer = adapter.make_optimizer(*wl.optimizer(cfg), model)
    adapter.train_step(model, optimizer, batch(wl, cfg, seed=0))
    saved, state = adapter.to_canonical(model), optimizer.state_dict()
    adapter.train_step(model, optimizer, batch(wl, cfg, seed=1))
    after, after_state = adapter.to_canonical(model), optimizer.state_dict()

    adapter.load_canonical(model, saved)
    optimizer.load_state_dict(state)
    adapter.train_step(model, optimizer, batch(wl, cfg, seed=1))
    return {
        "wl": wl,
        "cfg": cfg,
        "tree": tree,
        "trainable": trainable,
        "loss": loss,
        "grads": grads,
        "saved": saved,
        "state": state,
        "after": after,
        "after_state": after_state,
        "resumed": adapter.to_canonical(model),
        "resumed_state": optimizer.state_dict(),
    }


# --- the suite covers every workload ----------------------------------------------------------


def test_every_registered_workload_is_in_the_suite():
    assert sorted(WORKLOADS) == workloads.names()


# --- canonical weights ------------------------------------------------------------------------


def test_build_exports_init_canonical_with_the_canonical_specs(case):
    wl, cfg, built = case["wl"], case["cfg"], case["built"]
    assert tree_specs(built) == wl.canonical_specs(cfg)
    assert_bit_identical(built, wl.init_canonical(cfg, seed=0))


def test_loaded_weights_export_bit_identically(case):
    assert_bit_identical(case["adapter"].to_canonical(case["model"]), case["tree"])


def test_trainable_names_and_param_count_follow_the_canonical_specs(case):
    wl, cfg = case["wl"], case["cfg"]
    specs = wl.canonical_specs(cfg)
    params = [k for k in specs if not is_buffer(k)]
    lora = any(map(is_adapter, params))  # LoRA trains its adapters only
    want = [k for k in params if is_adapter(k) or not lora]
    assert sorted(case["adapter"].trainable_names(case["model"])) == sorted(want)
    # param_count is the model's size as MLPerf quotes it: LoRA adapters and buffers aside.
    sizes = {k: int(np.prod(shape)) for k, (shape, _) in specs.items()}
    assert wl.param_count(cfg) == sum(sizes[k] for k in params if not is_adapter(k))


def test_set_trainable_trains_the_names_it_accepts_then_everything(case):
    adapter, model, tree = case["adapter"], case["model"], case["tree"]
    built = adapter.trainable_names(model)
    params = [k for k in tree if not is_buffer(k)]
    subset = params[::2]  # every other weight, whatever its role (LoRA's base included)
    try:
        adapter.set_trainable(model, lambda name: name in subset)
        assert sorted(adapter.trainable_names(model)) == sorted(subset)
        adapter.set_trainable(model, lambda name: True)
        assert sorted(adapter.trainable_names(model)) == sorted(params)
    finally:  # as built again, for the other tests of this model
        adapter.set_trainable(model, lambda name: name in built)
    assert adapter.trainable_names(model) == built
    assert_bit_identical(adapter.to_canonical(model), tree)  # flags only: no weight touched


# --- the forward ------------------------------------------------------------------------------


@pytest.mark.requires("torch")
def test_forward_gives_pytorchs_output_names_shapes_and_dtypes(case, torch_outputs):
    # The values are the parity command's business (test_cli_parity_passes_for_every_pair).
    wl, cfg = case["wl"], case["cfg"]
    out = case["adapter"].forward(case["model"], batch(wl, cfg, seed=2))
    assert tree_specs(out) == tree_specs(torch_outputs)
    assert out["loss"].shape == () and out["loss"].dtype == np.float32
    for name, value in out.items():
        assert np.isfinite(value).all(), name


@pytest.mark.parametrize("workload", POSITIONAL, indirect=True)
def test_input_longer_than_max_positions_is_refused(case):
    cfg = case["cfg"]
    long = {}
    for name, value in batch(case["wl"], cfg, seed=0).items():
        if value.ndim >= 2 and value.shape[1] == cfg.seq_len:  # a sequence: make it too long
            value = np.resize(value[:1], (1, cfg.max_positions + 1, *value.shape[2:]))
        long[name] = value[:1]
    with pytest.raises(ValueError, match="max_positions"):
        case["adapter"].forward(case["model"], long)


# --- training ---------------------------------------------------------------------------------


def test_gradients_cover_exactly_the_trainable_names(trained):
    specs = trained["wl"].canonical_specs(trained["cfg"])
    grads = trained["grads"]
    assert np.isfinite(trained["loss"])
    assert sorted(grads) == sorted(trained["trainable"])
    assert tree_specs(grads) == {k: specs[k] for k in grads}
    for name, grad in grads.items():
        assert np.isfinite(grad).all(), name
        # Every weight matrix is reached (a bias may get an exact zero: see gpt's key bias).
        assert grad.ndim < 2 or np.abs(grad).max() > 0, f"{name} gets no gradient"


def test_training_moves_only_the_trainable_weights(trained):
    tree, after, trainable = trained["tree"], trained["after"], set(trained["trainable"])
    assert set(after) == set(tree)
    for name in tree:
        if name not in trainable and not is_buffer(name):
            assert np.array_equal(after[name], tree[name]), f"{name} is frozen but moved"
    assert any(not np.array_equal(after[k], tree[k]) for k in trainable)


def test_optimizer_state_has_a_slot_per_trainable_weight_in_canonical_layout(trained):
    spec, _ = trained["wl"].optimizer(trained["cfg"])
    state, saved = trained["state"], trained["saved"]
    assert int(state["step"]) == 1 and state["step"].dtype == np.int64
    want = {"step"} | {f"{slot}/{name}" for slot in spec.slots for name in trained["trainable"]}
    assert set(state) == want
    for key, value in state.items():
        if key != "step":
            assert value.shape == saved[key.split("/", 1)[1]].shape, key


def test_resuming_from_canonical_weights_and_state_continues_bit_identically(trained):
    assert_bit_identical(trained["resumed"], trained["after"])
    assert_bit_identical(trained["resumed_state"], trained["after_state"])


# --- each workload's commands -----------------------------------------------------------------


@EVERY_FRAMEWORK
@pytest.mark.parametrize("name", WORKLOADS)
def test_cli_parity_passes_for_every_pair(name, capsys):
    # 3 steps: the command's path for every workload (each workload's own tests compare the
    # forward, gradients and optimizer steps with torch)
    assert cli.main(["parity", name, "--preset", "tiny", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out
    for pair in ("torch-jax", "torch-tf", "jax-tf"):
        assert re.search(rf"parameter after 3 steps\s+{pair}\s", out), pair


@pytest.mark.parametrize("name", WORKLOADS)
def test_info_of_the_largest_preset_prints_the_size_and_allocates_nothing(name):
    wl = workloads.get(name)
    preset = max(wl.presets, key=lambda p: wl.param_count(wl.config(p)))
    tracemalloc.start()  # numpy's arrays are traced too
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert cli.main(["info", name, "--preset", preset]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{wl.param_count(wl.config(preset)):,}" in out.getvalue()
    assert peak < 16e6  # bytes; the weights of every largest preset but toy's take gigabytes


@EVERY_FRAMEWORK
@pytest.mark.parametrize("name", WORKLOADS)
def test_cli_convert_through_every_format_is_bit_identical(name, tmp_path):
    wl, cfg = workloads.get(name), workloads.get(name).config("tiny")
    tree = random_weights(wl, cfg, seed=5)
    formats = ["a.safetensors", "a.pt", "orbax", "a.weights.h5"]
    # A Hugging Face directory holds no LoRA adapters (test_llama_workload checks that leg).
    if wl.hf is not None and not any(map(is_adapter, tree)):
        formats.append("a.hf")
    chain = [tmp_path / f for f in [*formats, "back.safetensors"]]
    convert.save(tree, chain[0])
    for src, dst in itertools.pairwise(chain):
        assert cli.main(["convert", name, str(src), str(dst), "--preset", "tiny"]) == 0
    assert_bit_identical(convert.load(chain[-1]), tree)

"""The toy workload end to end: three-framework parity, conversion from a checkpoint path, and
the convert command's refusals (conversion through every format: test_workload_contract.py)."""

import numpy as np
import pytest

from mlperf_tutor import cli, convert, parity, workloads
from mlperf_tutor.core.parity import OUTPUT_ATOL, STEP_RTOL

pytestmark = pytest.mark.requires("torch", "jax", "tf")

WL = workloads.get("toy")
CFG = WL.config("tiny")


@pytest.fixture(scope="module")
def report():
    return parity.run(WL, CFG, steps=10)


def test_parity_every_pair_meets_the_bars(report):
    assert report.ok, report.table()
    pairs = {row.pair for row in report.rows}
    assert pairs == {"torch-jax", "torch-tf", "jax-tf"}


def test_parity_compares_outputs_gradients_parameters_and_state(report):
    groups = {row.group for row in report.rows}
    assert groups == {
        "output",
        "train loss",
        "gradient",
        "parameter after 10 steps",
        "optimizer state after 10 steps",
    }
    names = {row.name for row in report.rows if row.group == "parameter after 10 steps"}
    assert names == set(WL.canonical_specs(CFG))  # running statistics included
    grads = {row.name for row in report.rows if row.group == "gradient"}
    assert grads == set(WL.canonical_specs(CFG)) - {"bn.running_mean", "bn.running_var"}
    for row in report.rows:
        if row.group in ("output", "train loss"):
            assert (row.metric, row.bound) == ("max_abs", OUTPUT_ATOL)
        else:
            assert (row.metric, row.bound) == ("rel", STEP_RTOL)


def test_training_moved_the_weights(report):
    # Parity after training means something only if training changed the weights.
    assert len(report.losses["torch"]) == 10 and np.isfinite(report.losses["torch"]).all()
    trained = parity.framework_results(WL, CFG, "torch", steps=10, batch_size=2, seed=0)["params"]
    initial = WL.init_canonical(CFG, seed=0)
    for name in trained:
        assert np.abs(trained[name] - initial[name]).max() > 1e-4, name


def test_weights_move_torch_jax_tf_torch_bit_identically():
    tree = WL.init_canonical(CFG, seed=3)
    current = tree
    for framework in ("torch", "jax", "tf", "torch"):
        current = WL.export(framework, WL.build(framework, CFG, weights=current))
    assert set(current) == set(tree)
    for name in tree:
        assert current[name].dtype == tree[name].dtype
        assert np.array_equal(current[name], tree[name]), name


def test_forward_outputs_agree_within_bar():
    tree = WL.init_canonical(CFG, seed=4)
    batch = WL.synthetic_batch(CFG, batch_size=3, seed=4)
    outs = {f: WL.forward(f, WL.build(f, CFG, weights=tree), batch) for f in ("torch", "jax", "tf")}
    for f in ("jax", "tf"):
        for key in ("logits", "loss"):
            assert np.abs(outs[f][key] - outs["torch"][key]).max() <= OUTPUT_ATOL


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "toy.safetensors"
    tree = WL.init_canonical(CFG, seed=5)
    convert.save(tree, path)
    return path, tree


def test_cli_convert_refuses_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    dst = tmp_path / "out.pt"
    assert cli.main(["convert", "toy", str(bad), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and err.count("\n") == 1
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_cli_convert_refuses_checkpoint_of_another_model(tmp_path, capsys):
    other = tmp_path / "small.safetensors"
    convert.save(WL.init_canonical(WL.config("small")), other)
    dst = tmp_path / "out_ckpt"
    assert cli.main(["convert", "toy", str(other), str(dst), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "conv1.weight" in err and "embed.weight" in err
    assert not dst.exists()


def test_cli_convert_refuses_wrong_shaped_tensor(tmp_path, saved, capsys):
    src, tree = saved
    tree = dict(tree, **{"head.bias": np.zeros(7, np.float32)})
    wrong = tmp_path / "wrong.safetensors"
    convert.save(tree, wrong)
    dst = tmp_path / "out.weights.h5"
    assert cli.main(["convert", "toy", str(wrong), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "head.bias: got ((7,), 'float32'), expected ((5,), 'float32')" in err
    assert not dst.exists()


def test_build_from_checkpoint_path(saved):
    src, tree = saved
    model = WL.build("jax", CFG, weights=src)
    exported = WL.export("jax", model)
    assert all(np.array_equal(exported[k], tree[k]) for k in tree)

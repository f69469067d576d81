"""BERT end to end: the parity command, training in three frameworks, info, conversion."""

import itertools
import re

import numpy as np
import pytest

from mlperf_tutor import cli, convert, frameworks, train, workloads

pytestmark = pytest.mark.requires("torch", "jax", "tf")

WL = workloads.get("bert")
CFG = WL.config("tiny")


def test_cli_parity_passes_for_every_pair(capsys):
    assert cli.main(["parity", "bert", "--preset", "tiny", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out
    for pair in ("torch-jax", "torch-tf", "jax-tf"):
        assert re.search(rf"parameter after 10 steps\s+{pair}\s", out), pair


@pytest.fixture(scope="module")
def curves():
    return {
        f: np.array(
            train.train(WL, f, CFG, max_steps=50, deterministic=True, progress=False).losses
        )
        for f in frameworks.NAMES
    }


def test_loss_curves_agree_over_50_steps(curves):
    for framework in ("jax", "tf"):
        assert np.abs(curves[framework] - curves["torch"]).max() <= 1e-5, framework
    assert curves["torch"][-10:].mean() < curves["torch"][:10].mean()


def test_info_mlperf_without_allocating(capsys):
    assert cli.main(["info", "bert", "--preset", "mlperf"]) == 0
    out = capsys.readouterr().out
    # transformers' BertForPreTraining for the same config (checked in test_bert_hf.py).
    assert "336,226,108" in out
    assert "training FLOPs per sequence" in out


def test_convert_through_every_framework_format_and_hf(tmp_path):
    tree = WL.init_canonical(CFG, seed=2)
    chain = [
        tmp_path / "bert.safetensors",
        tmp_path / "bert.pt",
        tmp_path / "orbax",
        tmp_path / "bert.weights.h5",
        tmp_path / "bert.hf",
        tmp_path / "back.safetensors",
    ]
    convert.save(tree, chain[0])
    for src, dst in itertools.pairwise(chain):
        assert cli.main(["convert", "bert", str(src), str(dst), "--preset", "tiny"]) == 0
    back = convert.load(chain[-1])
    assert set(back) == set(tree)
    assert all(np.array_equal(back[k], tree[k]) and back[k].dtype == tree[k].dtype for k in tree)

"""BERT end to end: training in three frameworks and info (parity and conversion:
test_workload_contract.py)."""

import numpy as np
import pytest

from mlperf_tutor import cli, frameworks, train, workloads

pytestmark = pytest.mark.requires("torch", "jax", "tf")

WL = workloads.get("bert")
CFG = WL.config("tiny")


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


def test_info_reports_the_training_flops_per_sequence(capsys):
    assert cli.main(["info", "bert", "--preset", "mlperf"]) == 0
    assert "training FLOPs per sequence" in capsys.readouterr().out

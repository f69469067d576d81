"""The training loop and the `train` command."""

import csv

import numpy as np
import pytest

from mlperf_tutor import cli, frameworks, train

pytestmark = pytest.mark.requires("torch", "jax", "tf")


@pytest.fixture(scope="module")
def curves():
    return {
        f: train.train("toy", f, "tiny", max_steps=20, progress=False).losses
        for f in frameworks.NAMES
    }


def test_loss_curves_of_the_three_frameworks_agree(curves):
    reference = np.array(curves["torch"])
    assert reference[-5:].mean() < reference[:5].mean()  # it learns
    for framework in ("jax", "tf"):
        # Loss values are outputs: the max-abs bar of DESIGN.md, at every step of the run.
        assert np.abs(np.array(curves[framework]) - reference).max() <= 1e-5, framework


def test_cli_train_writes_the_curve(tmp_path, capsys):
    path = tmp_path / "curve.csv"
    argv = ["train", "toy", "--framework", "torch", "--max-steps", "3", "--curve", str(path)]
    assert cli.main(argv) == 0
    assert "toy torch: 3 steps" in capsys.readouterr().out
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["step", "loss", "eval"] and [r[0] for r in rows[1:]] == ["0", "1", "2"]
    assert all(np.isfinite(float(r[1])) for r in rows[1:])
    assert all(r[2] == "" for r in rows[1:])  # the toy workload has no evaluation


def test_curve_holds_the_metric_after_each_evaluation(tmp_path):
    # bert tiny evaluates every 40 samples, i.e. after steps 4 and 9 at batch size 8.
    path = tmp_path / "bert.csv"
    result = train.train("bert", "torch", "tiny", max_steps=10, curve=path, progress=False)
    rows = list(csv.DictReader(path.open()))
    assert [int(r["step"]) for r in rows if r["eval"]] == [4, 9]
    assert [float(r["eval"]) for r in rows if r["eval"]] == pytest.approx(
        [quality for _, quality in result.evals]
    )


def test_train_refuses_zero_max_steps():
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        train.train("toy", "torch", max_steps=0, progress=False)

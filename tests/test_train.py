"""The training loop and the `train` command."""

import csv
import sys

import numpy as np
import pytest

from mlperf_tutor import cli, frameworks, train, workloads

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
    assert "toy torch on cpu (fp32): 3 steps from step 0" in capsys.readouterr().out
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


@pytest.mark.parametrize("max_steps", [0, -3, 1.5, True])
def test_train_refuses_a_step_count_that_is_not_a_positive_whole_number(max_steps):
    with pytest.raises(ValueError, match="max_steps must be at least 1 and a whole number"):
        train.train("toy", "torch", max_steps=max_steps, progress=False)


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, False])
def test_train_refuses_a_batch_size_that_is_not_a_positive_whole_number(batch_size):
    # 0 once fell back silently to the preset's batch size.
    with pytest.raises(ValueError, match="batch_size must be at least 1 and a whole number"):
        train.train("toy", "torch", max_steps=2, batch_size=batch_size, progress=False)


@pytest.mark.parametrize("target", [float("nan"), float("inf"), "2.5"])
def test_train_refuses_a_target_that_is_not_a_finite_number(target):
    # gpt3's target is a log perplexity (lower is better): nan and inf passed its > 0 check.
    with pytest.raises(ValueError, match="target must be a finite number"):
        train.train("gpt3", "torch", max_steps=2, target=target, progress=False)


def test_an_unknown_framework_is_named_before_anything_starts():
    with pytest.raises(ValueError, match="unknown framework 'tensorflow'"):
        train.train("toy", "tensorflow", max_steps=2, device="cpu", mesh="data=2", progress=False)


def test_a_mesh_run_in_a_missing_framework_names_the_extra(monkeypatch):
    # Simulating a mesh's CPU devices imported TensorFlow before the framework was checked, so
    # where TensorFlow is missing the run ended in a bare ModuleNotFoundError.
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` fails
    with pytest.raises(frameworks.FrameworkNotInstalled, match="pip install"):
        train.train("toy", "tf", max_steps=2, device="cpu", mesh="data=2", progress=False)


def test_train_returns_the_trained_model():
    result = train.train("toy", "jax", max_steps=3, progress=False, device="cpu")
    assert result.device.lower().startswith("cpu") and result.precision == "fp32"
    # The model is the trained one: a forward on the next batch is no longer the initial one's.
    wl = workloads.get("toy")
    initial = wl.build("jax", wl.config("tiny"))
    trained = wl.export("jax", result.model)
    assert any(not np.array_equal(trained[k], v) for k, v in wl.export("jax", initial).items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device": "gpu0"}, "unknown device 'gpu0'"),
        ({"precision": "fp16"}, "unknown precision 'fp16'"),
        ({"checkpoint_every": 5}, "checkpoint_every needs checkpoint_dir"),
        ({"resume": True}, "resume needs checkpoint_dir"),
    ],
)
def test_train_refuses_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.train("toy", "torch", max_steps=2, progress=False, **kwargs)


@pytest.mark.parametrize("framework", frameworks.NAMES)
def test_asking_for_a_gpu_where_there_is_none_names_the_fix(framework):
    with pytest.raises(ValueError, match="--device cpu or auto"):
        train.train("toy", framework, max_steps=2, progress=False, device="gpu")


def test_mfu_from_the_device_name_and_the_workload_flops():
    from mlperf_tutor.train import progress

    assert progress.peak_flops("cuda:0 (NVIDIA H100 80GB HBM3)") == 989e12
    assert progress.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert progress.peak_flops("cpu") is None
    assert progress.mfu(1e9, 1e5, "NVIDIA H200") == pytest.approx(1e14 / 989e12)
    assert progress.mfu(1e9, 1e5, "cpu") is None
    assert progress.mfu(None, 1e5, "NVIDIA H200") is None


def test_cli_make_sample_data_then_train_from_it_with_checkpoints(tmp_path, capsys):
    # llama2_70b_lora tiny: gpt3 tiny's 2048-token sequences make bf16 steps minutes on a CPU.
    name = "llama2_70b_lora"
    assert cli.main(["make-sample-data", name, str(tmp_path / "data"), "--samples", "16"]) == 0
    out = capsys.readouterr().out
    path = out.split(" in ")[1].split(" (pass")[0]
    argv = [
        "train",
        name,
        "--framework",
        "torch",
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--data",
        path,
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--checkpoint-every",
        "2",
        "--precision",
        "bf16",
        "--device",
        "cpu",
        "--target",
        "1e-9",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "(bf16): 4 steps from step 0" in out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step_00000002",
        "step_00000004",
    ]
    assert cli.main([*argv[:5], "6", *argv[6:], "--resume"]) == 0
    assert "2 steps from step 4" in capsys.readouterr().out


def test_a_bad_data_path_fails_before_training(tmp_path, monkeypatch):
    wl = workloads.get("toy")
    trained = []
    monkeypatch.setattr(wl, "build", lambda *a, **k: trained.append(1))
    with pytest.raises(ValueError, match=str(tmp_path / "missing")):
        train.train("toy", "torch", max_steps=2, progress=False, data=tmp_path / "missing")
    assert not trained  # no model was built: the reader refused the path first


@pytest.mark.parametrize("framework", frameworks.NAMES)
@pytest.mark.parametrize("name", ["bert", "gpt3"])
def test_the_accelerator_build_of_a_model_with_attention_dropout_trains(name, framework):
    # On a GPU the training path builds the model with fused=True. JAX's and Keras's fused
    # kernels have no attention-probability dropout, and BERT's attention has 0.1: its JAX model
    # was refused with a ValueError, so `train bert --device gpu` failed in JAX at the build.
    # There the attentions with dropout keep the explicit path, so the fused build trains
    # exactly as the explicit one; torch's kernel drops the probabilities itself.
    wl = workloads.get(name)
    short = {"seq_len": 64} if name == "gpt3" else {}  # 2048-token sequences: seconds a step
    cfg = wl.config("tiny", dropout=0.1, **short)
    adapter = frameworks.get(framework)
    device = adapter.use_device("cpu")
    losses = {}
    for fused in (False, True):
        model = wl.build(framework, cfg, fused=fused)
        trainer = adapter.Trainer(model, *wl.optimizer(cfg), device=device, seed=0)
        handles = [trainer.step(wl.synthetic_batch(cfg, batch_size=2, seed=s)) for s in range(2)]
        losses[fused] = [trainer.loss_value(h) for h in handles]
    assert np.isfinite(losses[True]).all()
    if framework != "torch":
        assert losses[True] == losses[False]

"""The parallel plan in TensorFlow (``mlperf_tutor.parallel.tf``): MirroredStrategy data
parallelism on logical CPU devices equals single-device training, its checkpoints move between
replica counts, and the meshes TensorFlow cannot realise are refused.

TensorFlow splits the CPU into logical devices only before it starts, and this process has
imported it already (other test modules), so every check runs in one subprocess
(``parallel_tf_worker.py``) that prints a JSON report; the tests assert on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.requires("tf"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "parallel_tf_worker.py"
WORKLOADS = ("bert", "gpt3", "llama2_70b_lora")
TRAINED = [
    (name, replicas)
    for name, counts in {"bert": (2, 4), "gpt3": (2,), "llama2_70b_lora": (2, 4)}.items()
    for replicas in counts
]
LOSS_ATOL = 1e-5  # max-abs, float32 losses
PARAM_RTOL = 1e-4  # per parameter: max-abs difference over the parameter's max-abs value


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("parallel_tf")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(WORKER), str(out), *WORKLOADS],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_worker_has_four_logical_cpus(report):
    assert report["devices"] == 4


def test_keras_model_parallel_ignores_layouts_on_tf(report):
    """Why fsdp and tensor are refused: on the TF backend a LayoutMap asks for a split kernel,
    and the variable is still one whole tf.Variable on the first device."""
    keras = report["keras"]
    assert keras["asked_layout"] == [None, "model"]
    assert keras["variable_type"] == "ResourceVariable"
    assert keras["variable_shape"] == [4, 8]
    assert keras["variable_device"].endswith("CPU:0")
    assert "distribute_tensor" in keras["distribute_tensor_error"]


@pytest.mark.parametrize(("name", "replicas"), TRAINED)
def test_replicas_hold_mirrored_copies(report, name, replicas):
    run = report[name][f"data={replicas}"]
    assert run["replicas"] == replicas
    assert run["variable_type"] == "MirroredVariable"
    assert run["copies"] == replicas
    assert run["copies_identical"]
    assert run["steps"] == 10


@pytest.mark.parametrize(("name", "replicas"), TRAINED)
def test_data_parallel_losses_equal_single_device(report, name, replicas):
    assert report[name][f"data={replicas}"]["loss_max_abs"] <= LOSS_ATOL


@pytest.mark.parametrize(("name", "replicas"), TRAINED)
def test_data_parallel_params_equal_single_device(report, name, replicas):
    run = report[name][f"data={replicas}"]
    assert run["param_max_rel"] <= PARAM_RTOL
    assert run["state_max_rel"] <= PARAM_RTOL


@pytest.mark.parametrize("name", ["bert", "llama2_70b_lora"])
def test_parity_covers_the_global_gradient_clip(report, name):
    """bert and llama tiny start above their clip norm, so the parity above covers the clip
    of the summed gradient (clipping each replica's gradient before the sum would differ)."""
    assert report[name]["grad_norm"] > report[name]["clip_norm"]


@pytest.mark.parametrize("name", WORKLOADS)
@pytest.mark.parametrize("target", ["data=1", "data=4"])
def test_checkpoint_of_two_replicas_restores_bit_identical(report, name, target):
    restored = report[name]["restore"][target]
    assert restored["weights_identical"]
    assert restored["state_identical"]
    assert restored["steps"] == 10


@pytest.mark.parametrize("name", WORKLOADS)
def test_step_after_restore_equals_on_one_and_two_replicas(report, name):
    resume = report[name]["resume"]
    assert resume["loss_abs"] <= LOSS_ATOL
    assert resume["param_max_rel"] <= PARAM_RTOL


@pytest.mark.parametrize("name", WORKLOADS)
@pytest.mark.parametrize("mesh", ["fsdp=2", "data=2,tensor=2"])
def test_sharded_meshes_are_refused(report, name, mesh):
    message = report[name]["errors"][mesh]
    assert message is not None
    assert "ModelParallel" in message
    assert "torch" in message and "jax" in message


def test_mesh_larger_than_devices_is_refused(report):
    message = report["bert"]["errors"]["data=5"]
    assert "needs 5 devices" in message and "sees 4" in message


def test_batch_not_divisible_by_replicas_is_refused(report):
    message = report["bert"]["errors"]["odd batch"]
    assert "3 examples" in message and "multiple of 2" in message


def test_model_built_outside_the_strategy_is_refused(report):
    message = report["bert"]["errors"]["built outside"]
    assert "does not mirror" in message and "building(plan)" in message

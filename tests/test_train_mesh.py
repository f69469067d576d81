"""``mlperf-tutor train --mesh``: the training path on a device mesh in the three frameworks.

Each sharded run is the real command in a fresh process (torch under the torchrun it starts,
JAX and TensorFlow with the mesh's devices simulated on the CPU); its loss curve and its final
evaluation must equal the single-device run's within the parity bars. The realisations are
tested in depth by test_parallel_{torch,jax,tf}; this checks that the command runs them.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from mlperf_tutor import train
from mlperf_tutor.core.parity import OUTPUT_ATOL
from mlperf_tutor.parallel import ParallelError

pytestmark = pytest.mark.requires("torch", "jax", "tf")

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD, STEPS, BATCH = "llama2_70b_lora", 3, 4
# The mesh each framework realises: torch and JAX split weights (fsdp x tensor); TensorFlow
# replicates only (parallel.tf says why).
MESHES = {"torch": "fsdp=2,tensor=2", "jax": "fsdp=2,tensor=2", "tf": "data=2"}
COMMON = ["--device", "cpu", "--max-steps", str(STEPS), "--batch-size", str(BATCH)]


def command(framework: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlperf_tutor",
        "train",
        WORKLOAD,
        "--framework",
        framework,
        *COMMON,
        "--deterministic",
        *extra,
    ]


def read_curve(path: Path) -> tuple[list[float], float]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return [float(r["loss"]) for r in rows], float(rows[-1]["eval"])


@pytest.fixture(scope="module")
def single():
    """The single-device run (torch, in this process) that every sharded run must equal."""
    result = train.train(
        WORKLOAD,
        "torch",
        max_steps=STEPS,
        batch_size=BATCH,
        deterministic=True,
        device="cpu",
        progress=False,
    )
    return result.losses, result.evals[-1][1]


@pytest.mark.parametrize("framework", sorted(MESHES))
def test_train_on_a_mesh_equals_the_single_device_run(framework, single, tmp_path):
    curve = tmp_path / "curve.csv"
    done = subprocess.run(
        command(framework, "--mesh", MESHES[framework], "--curve", str(curve)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses, evaluated = read_curve(curve)
    want_losses, want_eval = single
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, want_losses, strict=True)) <= OUTPUT_ATOL
    assert abs(evaluated - want_eval) <= OUTPUT_ATOL
    assert losses[-1] != losses[0]  # it trained


def test_a_mesh_tensorflow_cannot_realise_is_one_error():
    done = subprocess.run(
        command("tf", "--mesh", "fsdp=2"), capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("mlperf-tutor: error")]
    assert len(errors) == 1 and "TensorFlow can only replicate" in errors[0], done.stderr[-2000:]


def test_torch_on_a_mesh_needs_its_processes_and_no_run_checkpoints(tmp_path):
    run = dict(max_steps=1, batch_size=BATCH, device="cpu", progress=False, mesh="fsdp=2")
    with pytest.raises(ParallelError, match="start it with torchrun"):
        train.train(WORKLOAD, "torch", **run)
    with pytest.raises(ValueError, match="drop checkpoint_dir"):
        train.train(WORKLOAD, "torch", **run, checkpoint_dir=tmp_path)

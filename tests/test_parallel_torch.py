"""The parallel plan in PyTorch (mlperf_tutor.parallel.torch) on CPU processes (gloo).

Two launches of ``tests/parallel_torch_worker.py`` do every check and write JSON reports that the
tests read: four processes on fsdp=2,tensor=2 (FSDP2 over tensor parallelism; writes a DCP
checkpoint) and on data=2,fsdp=2 (HSDP; gpt3 only), then two processes on fsdp=2, tensor=2 and
data=2 in turn (each restores that checkpoint, resharded). Each mesh trains gpt3,
llama2_70b_lora and (without tensor) bert tiny for 10 steps from the same weights and global
batches as the single-device Trainer (rank 0 runs it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.requires("torch")

from mlperf_tutor.parallel.plan import MeshShape, ParallelError, plan  # noqa: E402
from mlperf_tutor.workloads import get  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "parallel_torch_worker.py"
WORKLOADS = ("gpt3", "llama2_70b_lora", "bert")
WRITER = "fsdp=2,tensor=2"  # four processes; writes the checkpoint the others read
HSDP = "data=2,fsdp=2"  # four processes too, gpt3 only
READERS = ("fsdp=2", "tensor=2", "data=2")  # two processes
MESHES = (WRITER, HSDP, *READERS)
# BERT's tied MLM head computes on the embedding matrix with plain-tensor ops that a
# vocabulary-split (DTensor) matrix cannot enter: no tensor meshes for it (see the worker).
CASES = [
    (mesh, workload)
    for mesh in MESHES
    for workload in WORKLOADS
    if not (workload == "bert" and "tensor" in mesh) and (mesh != HSDP or workload == "gpt3")
]


def launch(meshes: str, nproc: int, out: Path, workdir: Path, *flags: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, str(WORKER), meshes, str(nproc), str(out), str(workdir)]
    done = subprocess.run(
        [*command, *flags, *WORKLOADS], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["errors"] == [], report["errors"][0]
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """Mesh text -> the report of that mesh (workload -> checks), plus "bad_world"."""
    workdir = tmp_path_factory.mktemp("parallel_torch")
    writer = launch(f"{WRITER};{HSDP}@gpt3", 4, workdir / "writer.json", workdir, "--save")
    readers = launch(";".join(READERS), 2, workdir / "readers.json", workdir, "--load")
    merged = {mesh: readers[mesh] for mesh in READERS}
    merged[WRITER], merged[HSDP] = writer[WRITER], writer[HSDP]
    merged["bad_world"] = [writer["bad_world"], readers["bad_world"]]
    return merged


@pytest.mark.parametrize(("mesh", "workload"), CASES)
def test_sharded_losses_match_single_device(reports, mesh, workload):
    entry = reports[mesh][workload]
    assert len(entry["losses"]) == len(entry["ref_losses"]) == 10
    assert entry["loss_max_abs"] <= 1e-5, (entry["losses"], entry["ref_losses"])


@pytest.mark.parametrize(("mesh", "workload"), CASES)
def test_sharded_weights_match_single_device_after_10_steps(reports, mesh, workload):
    entry = reports[mesh][workload]
    # The run moves the weights far more than the bar, so a wrong gradient cannot pass.
    assert entry["param_moved_rel"] > 0.05
    assert entry["param_max_rel"] <= 1e-4
    assert entry["opt_max_rel"] <= 1e-4


@pytest.mark.parametrize(("mesh", "workload"), CASES)
def test_every_rank_gathers_the_same_full_state(reports, mesh, workload):
    assert reports[mesh][workload]["same_on_every_rank"]


@pytest.mark.parametrize(
    ("mesh", "engine"),
    [
        (WRITER, "FSDPGptDecoder"),  # fully_shard over parallelize_module's DTensors
        (HSDP, "FSDPGptDecoder"),
        ("fsdp=2", "FSDPGptDecoder"),
        ("tensor=2", "GptDecoder"),  # parallelize_module alone
        ("data=2", "DistributedDataParallel"),
    ],
)
def test_each_mesh_runs_its_engine(reports, mesh, engine):
    assert reports[mesh]["gpt3"]["engine"] == engine


@pytest.mark.parametrize(("mesh", "workload"), CASES)
def test_local_shard_shapes_follow_the_plan(reports, mesh, workload):
    entry = reports[mesh][workload]
    assert entry["shape_mismatches"] == {}
    assert entry["checked_shapes"] > 0
    # Something is really split, except on the data-only mesh, which replicates everything.
    assert (entry["split_shapes"] > 0) == (mesh != "data=2")


def test_fsdp_shards_what_the_plan_keeps_whole_on_dim_0(reports):
    # FSDP2 has no per-parameter replicate: the tensor-split biases, which fsdp=2 cannot split
    # again on their one (tensor) dimension in the plan, are still sharded by FSDP2.
    assert reports[WRITER]["gpt3"]["fsdp_departures"] == [
        f"blocks.{i}.{name}.bias"
        for i in range(2)
        for name in ("attention.k_proj", "attention.q_proj", "attention.v_proj", "mlp.fc_in")
    ]
    assert reports["fsdp=2"]["gpt3"]["fsdp_departures"] == []


@pytest.mark.parametrize("mesh", READERS)
def test_dcp_checkpoint_restores_on_another_mesh(reports, mesh):
    assert reports[WRITER]["gpt3"]["saved"] == "data=1,fsdp=2,tensor=2"
    entry = reports[mesh]["gpt3"]
    assert entry["restored_weights_equal"]
    assert entry["restored_state_equal"]
    assert entry["restored_steps"] == 10


def test_bf16_mixed_precision_policy_trains(reports):
    entry = reports["fsdp=2"]
    # bf16 compute on gathered weights; float32 sharded parameters (and optimizer updates).
    assert entry["bf16_compute_dtypes"] == ["torch.bfloat16"]
    assert entry["bf16_param_dtypes"] == ["torch.float32"]
    assert len(entry["bf16_losses"]) == 2
    assert all(math.isfinite(loss) for loss in entry["bf16_losses"])


def test_mesh_larger_than_the_world_is_one_clear_error(reports):
    for message in reports["bad_world"]:
        assert message.startswith("mesh data=1,fsdp=8,tensor=1 needs 8 processes")


def test_tensor_size_that_splits_a_head_is_refused():
    wl = get("llama2_70b_lora")
    with pytest.raises(ValueError, match="tensor=3 must divide the attention heads"):
        plan(wl, wl.config("tiny"), MeshShape(tensor=3))


def test_device_mesh_without_a_process_group_is_one_clear_error():
    from mlperf_tutor.parallel import torch as ptorch

    with pytest.raises(ParallelError, match="no torch.distributed process group"):
        ptorch.device_mesh(MeshShape(fsdp=2))

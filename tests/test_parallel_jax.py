"""JAX realises the parallel plan: a sharded Trainer on 8 CPU devices takes the same steps as
one device, every device holds the plan's slice, Orbax checkpoints move between meshes, and bad
meshes get one clear error.

JAX reads ``XLA_FLAGS`` (8 host devices) only when it is imported, and this process must keep
one device, so one subprocess (``parallel_jax_worker.py``) runs every check and prints a JSON
report, which the tests below assert on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.requires("jax")

import jax  # noqa: E402

import mlperf_tutor as mt  # noqa: E402
from mlperf_tutor import frameworks  # noqa: E402
from mlperf_tutor.parallel import MeshShape, ParallelError  # noqa: E402
from mlperf_tutor.parallel import jax as pj  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("parallel_jax_worker.py")
STEPS = 10  # the worker's

ALL_MESHES = ("data=8", "fsdp=4", "tensor=2", "data=2,tensor=2", "data=2,fsdp=2,tensor=2")
# Workload -> (config overrides, meshes). Each mesh costs a compilation (seconds on a CPU), so
# gpt3 runs on every mesh, llama and bert on tensor=2 alone and on the mesh that uses all three
# axes (llama also on fsdp=4: its frozen base is sliced too), and DLRM data parallel only (no
# tensor plan; its sharded tables are tested with DLRM). gpt3's 2048-token sequences would cost
# seconds per step on a CPU; 32 tokens keep its architecture. Llama's tiny lr (0.01) lets Adam
# turn the last-bit difference of a near-zero gradient (summed in another order across shards)
# into 3e-5 after 10 steps; at 1e-3 the comparison measures the sharding, not Adam's
# sensitivity to rounding.
WORKLOADS = {
    "gpt3": ({"seq_len": 32}, ALL_MESHES),
    "llama2_70b_lora": ({"lr": 1e-3}, ("fsdp=4", "tensor=2", "data=2,fsdp=2,tensor=2")),
    "bert": ({}, ("tensor=2", "data=2,fsdp=2,tensor=2")),
    "dlrm_dcnv2": ({}, ("data=8",)),
}
# Workload -> (the mesh whose trainer is saved after its steps, the meshes its Orbax checkpoint
# is restored on (None: one device, no plan), the mesh the canonical single file is loaded on).
RESHARD = {"gpt3": ("data=2,fsdp=2,tensor=2", ("fsdp=4", "tensor=2", None), "data=8")}
CASES = [(name, mesh) for name, (_, meshes) in WORKLOADS.items() for mesh in meshes]
IDS = [f"{name}-{mesh}" for name, mesh in CASES]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("parallel_jax")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cases = json.dumps({"workloads": WORKLOADS, "reshard": RESHARD})
    done = subprocess.run(
        [sys.executable, str(WORKER), str(directory), cases],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_worker_sees_eight_devices_and_every_workload(report):
    assert report["devices"] == 8
    # The flag stayed in the subprocess: this process's jax keeps its devices.
    assert "device_count=8" not in os.environ.get("XLA_FLAGS", "")
    assert set(report["workloads"]) == set(WORKLOADS)


@pytest.mark.parametrize(("name", "mesh"), CASES, ids=IDS)
def test_sharded_steps_equal_single_device_steps(report, name, mesh):
    parity = report["workloads"][name]["parity"][mesh]
    assert parity["loss_max_abs"] <= 1e-5, parity
    assert parity["params_relative"] <= 1e-4, parity
    assert parity["optimizer_relative"] <= 1e-4, parity
    assert parity["changed"] > 1e-3, parity  # the steps moved the weights: a real comparison


@pytest.mark.parametrize(("name", "mesh"), CASES, ids=IDS)
def test_every_device_holds_the_plans_slice(report, name, mesh):
    shards = report["workloads"][name]["shards"][mesh]
    assert shards["wrong_shapes"] == {}
    assert shards["wrong_slots"] == []  # each optimizer slot is sharded like its parameter
    assert shards["checked"] == len(shards["specs"]) > 0
    if MeshShape.parse(mesh).fsdp > 1:  # fsdp slices every parameter with an even dimension
        assert shards["split"] > shards["checked"] // 2, shards["split"]
    elif MeshShape.parse(mesh).tensor > 1:
        assert shards["split"] > 0


def test_jax_layout_permutes_the_canonical_partition(report):
    """A Linear kernel is (in, out) in Flax and (out, in) canonically: its spec is swapped."""
    specs = report["workloads"]["gpt3"]["shards"]["data=2,fsdp=2,tensor=2"]["specs"]
    assert specs["blocks.0.attention.q_proj.weight"] == ["fsdp", "tensor"]  # canonical (t, f)
    assert specs["blocks.0.attention.o_proj.weight"] == ["tensor", "fsdp"]  # canonical (f, t)
    assert specs["blocks.1.mlp.fc_in.weight"] == ["fsdp", "tensor"]
    assert specs["blocks.1.mlp.fc_out.weight"] == ["tensor", "fsdp"]
    assert specs["embeddings.word_embeddings.weight"] == ["tensor", "fsdp"]  # nnx.Embed: same
    assert specs["blocks.0.attention.q_proj.bias"] == ["tensor"]
    assert specs["embeddings.position_embeddings.weight"] == [None, "fsdp"]


@pytest.mark.parametrize(("name", "mesh"), CASES, ids=IDS)
def test_sharded_step_donates_its_state(report, name, mesh):
    assert report["workloads"][name]["donated"][mesh] is True


def test_orbax_checkpoint_restores_on_other_meshes_bit_identical(report):
    restored = report["workloads"]["gpt3"]["reshard"]
    for target, devices in (("fsdp=4", 4), ("tensor=2", 2), ("one device", 1)):
        got = restored[f"orbax -> {target}"]
        assert got["weights_identical"] and got["optimizer_identical"], target
        assert got["steps"] == STEPS
        assert got["devices"] == [devices], target
        if got["shards"] is not None:  # laid out as the target mesh's plan says
            assert got["shards"]["wrong_shapes"] == {} and got["shards"]["wrong_slots"] == []
            assert got["shards"]["split"] > 0


def test_canonical_file_loads_on_another_mesh(report):
    got = report["workloads"]["gpt3"]["reshard"]["canonical -> data=8"]
    assert got["weights_identical"] and got["optimizer_identical"]
    assert got["steps"] == STEPS and got["devices"] == [8]
    assert got["shards"]["wrong_shapes"] == {}


def test_bad_meshes_get_one_clear_error(report):
    errors = report["errors"]
    kind, text = errors["too_many_devices"]
    assert kind == "ParallelError" and "needs 16 devices, but there are 8" in text
    assert "xla_force_host_platform_device_count" in text
    kind, text = errors["device_mesh"]
    assert kind == "ParallelError" and "data=2,fsdp=8,tensor=1 needs 16 devices" in text
    kind, text = errors["heads"]
    assert "tensor=4 must divide the attention heads (2)" in text
    kind, text = errors["mesh_mismatch"]
    assert kind == "ParallelError" and "plan is for mesh data=2,fsdp=1,tensor=1" in text
    kind, text = report["workloads"]["gpt3"]["uneven_batch"]
    assert "splits the batch into 8" in text and "'input_ids': (4, 32)" in text


def test_partition_spec_of_a_plan_partition():
    spec = pj.partition_spec(((), ("tensor",), ("data", "fsdp")))
    assert spec == jax.sharding.PartitionSpec(None, "tensor", ("data", "fsdp"))


def test_device_mesh_refuses_more_devices_than_given():
    one = jax.devices()[:1]
    mesh = pj.device_mesh(MeshShape(), one)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (1, 1, 1)
    with pytest.raises(ParallelError, match="needs 2 devices, but there are 1"):
        pj.device_mesh(MeshShape(tensor=2), one)


def test_trainer_refuses_a_mesh_without_a_plan():
    wl = mt.workloads.get("toy")
    cfg = wl.config("tiny")
    model = wl.build("jax", cfg)
    mesh = pj.device_mesh(MeshShape(), jax.devices()[:1])
    with pytest.raises(ValueError, match="a mesh without a plan"):
        frameworks.get("jax").Trainer(model, *wl.optimizer(cfg), mesh=mesh)

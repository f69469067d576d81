"""The framework-free parallel plan: meshes, each parameter's split, per-device memory and
per-step traffic, and ``mlperf-tutor info --mesh`` (nothing allocated, no framework imported)."""

from __future__ import annotations

import contextlib
import io
import math
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from mlperf_tutor import cli, workloads
from mlperf_tutor.parallel import MeshShape, ParallelError, memory, plan


def tiny(name: str):
    wl = workloads.get(name)
    return wl, wl.config("tiny")


# --- meshes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "devices", "sizes"),
    [
        ("data=2,fsdp=2,tensor=2", None, (2, 2, 2)),
        ("fsdp=4", None, (1, 4, 1)),
        ("tensor=2, data=-1", 8, (4, 1, 2)),
        ("fsdp=-1", 3, (1, 3, 1)),
    ],
)
def test_mesh_text_gives_the_axis_sizes(text, devices, sizes):
    mesh = MeshShape.parse(text, devices)
    assert (mesh.data, mesh.fsdp, mesh.tensor) == sizes
    assert mesh.devices == math.prod(sizes)
    assert MeshShape.parse(str(mesh)) == mesh


@pytest.mark.parametrize(
    ("text", "devices", "message"),
    [
        ("pipeline=2", None, "AXIS one of"),
        ("data", None, "AXIS=SIZE"),
        ("data=2,data=2", None, "given twice"),
        ("fsdp=0", None, "positive integer or -1"),
        ("fsdp=2.0", None, "positive integer or -1"),
        ("fsdp=1e9", None, "positive integer or -1"),
        ("data=-1,fsdp=-1", 4, "only one axis"),
        ("data=-1", None, "needs the device count"),
        ("data=-1,tensor=3", 8, "do not divide"),
        ("data=2,fsdp=2", 8, "needs 4 devices, but there are 8"),
    ],
)
def test_bad_mesh_text_gets_one_error_naming_it(text, devices, message):
    with pytest.raises(ParallelError, match=message) as err:
        MeshShape.parse(text, devices)
    assert repr(text) in str(err.value) or "needs 4 devices" in str(err.value)


def test_mesh_sizes_must_be_positive_integers():
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ParallelError, match="positive integer"):
            MeshShape(fsdp=bad)


# --- partitions --------------------------------------------------------------------------------
def test_gpt3_splits_heads_and_mlp_over_tensor_and_the_width_over_fsdp():
    wl, cfg = tiny("gpt3")
    p = plan(wl, cfg, MeshShape(fsdp=2, tensor=2))
    d, f, v = cfg.hidden, cfg.ffn, cfg.padded_vocab_size
    expected = {
        "blocks.0.attention.q_proj.weight": (("tensor",), ("fsdp",)),  # (heads, embed)
        "blocks.0.attention.q_proj.bias": (("tensor",),),
        "blocks.0.attention.o_proj.weight": (("fsdp",), ("tensor",)),  # (embed, heads)
        "blocks.0.attention.o_proj.bias": (("fsdp",),),
        "blocks.0.mlp.fc_in.weight": (("tensor",), ("fsdp",)),
        "blocks.0.mlp.fc_out.weight": (("fsdp",), ("tensor",)),
        "embeddings.word_embeddings.weight": (("tensor",), ("fsdp",)),  # vocab-parallel
        "embeddings.position_embeddings.weight": ((), ("fsdp",)),
        "final_norm.weight": (("fsdp",),),
    }
    for name, part in expected.items():
        assert p.partitions[name] == part, name
    assert p.shard_shape("blocks.0.mlp.fc_in.weight") == (f // 2, d // 2)
    assert p.shard_shape("embeddings.word_embeddings.weight") == (v // 2, d // 2)
    assert p.split_over("blocks.0.mlp.fc_out.weight", "tensor") == 1
    assert p.split_over("embeddings.position_embeddings.weight", "tensor") is None


def test_llamas_fused_qkv_is_not_split_over_tensor_but_its_width_is_over_fsdp():
    # Its rows are all queries, then keys, then values: a contiguous split would separate them.
    wl, cfg = tiny("llama2_70b_lora")
    p = plan(wl, cfg, MeshShape(fsdp=2, tensor=2))
    assert p.partitions["blocks.0.attention.qkv_proj.weight"] == ((), ("fsdp",))
    assert p.split_over("blocks.0.attention.qkv_proj.lora_b.weight", "tensor") is None
    assert p.partitions["blocks.0.mlp.fc_gate.weight"] == (("tensor",), ("fsdp",))


@pytest.mark.parametrize("name", ["gpt3", "gptj", "bert", "llama2_70b_lora", "stable_diffusion"])
def test_fsdp_slices_every_parameter_that_has_a_dimension_it_divides(name):
    wl, cfg = tiny(name)
    p = plan(wl, cfg, MeshShape(fsdp=2))
    for param, shape in p.shapes.items():
        divisible = any(size % 2 == 0 for size in shape)
        assert (p.split_over(param, "fsdp") is not None) == divisible, param
        assert math.prod(p.shard_shape(param)) * (2 if divisible else 1) == math.prod(shape)


def test_a_data_only_mesh_replicates_every_transformer_parameter():
    wl, cfg = tiny("bert")
    p = plan(wl, cfg, MeshShape(data=4))
    assert all(p.shard_shape(n) == shape for n, shape in p.shapes.items())


def test_a_dimension_is_split_only_where_the_axes_divide_it():
    wl, cfg = tiny("dlrm_dcnv2")
    p = plan(wl, cfg, MeshShape(data=2, fsdp=2))
    for name, shape in p.shapes.items():
        for size, axes in zip(shape, p.partitions[name], strict=True):
            assert size % math.prod(p.mesh.sizes[a] for a in axes) == 0, name
    rows = {n: p.partitions[n][0] for n in p.shapes if n.startswith("embedding_bags.")}
    assert any(axes == ("data", "fsdp") for axes in rows.values())  # rows over every device


def test_ranks_count_tensor_fastest_then_fsdp_then_data():
    mesh = MeshShape(data=2, fsdp=3, tensor=2)
    expected = {0: (0, 0, 0), 1: (0, 0, 1), 2: (0, 1, 0), 5: (0, 2, 1), 6: (1, 0, 0), 11: (1, 2, 1)}
    for rank, coords in expected.items():
        assert tuple(mesh.coords(rank).values()) == coords
    with pytest.raises(ParallelError, match="devices 0 to 11, not 12"):
        mesh.coords(12)


@pytest.mark.parametrize("mesh", [MeshShape(2, 2, 2), MeshShape(fsdp=4), MeshShape(1, 2, 2)])
def test_the_devices_slices_cover_each_parameter_once_per_replica(mesh):
    wl, cfg = tiny("llama2_70b_lora")
    p = plan(wl, cfg, mesh)
    for name, shape in p.shapes.items():
        held = np.zeros(shape, dtype=int)
        for rank in range(mesh.devices):
            part = p.device_slices(name, rank)
            assert held[part].shape == p.shard_shape(name), name
            held[part] += 1
        used = {a for axes in p.partitions[name] for a in axes}
        assert (held == mesh.devices // math.prod(mesh.sizes[a] for a in used)).all(), name


@pytest.mark.parametrize(
    ("name", "mesh", "message"),
    [
        ("gpt3", MeshShape(tensor=3), r"tensor=3 must divide the attention heads \(2\)"),
        ("llama2_70b_lora", MeshShape(tensor=4), r"key/value heads"),
        ("dlrm_dcnv2", MeshShape(tensor=2), "no tensor-parallel plan"),
        ("stable_diffusion", MeshShape(tensor=2), "no tensor-parallel plan"),
    ],
)
def test_a_tensor_size_the_model_cannot_split_evenly_is_refused(name, mesh, message):
    wl, cfg = tiny(name)
    with pytest.raises(ValueError, match=message):
        plan(wl, cfg, mesh)


# --- memory and traffic ------------------------------------------------------------------------
def test_activation_estimate_is_korthikantis_formula():
    # Korthikanti et al. 2022: s h (34 + 5 a s / h) per layer; with tensor t and no sequence
    # parallelism, s h (10 + 24 / t + 5 a s / (h t)). Layers 2, s 4, h 8, a 2:
    assert memory.transformer_activation_bytes(2, 4, 8, 2) == 2 * 4 * 8 * (34 + 5)
    assert memory.transformer_activation_bytes(2, 4, 8, 2, tensor=2) == 2 * 4 * 8 * (10 + 12 + 2.5)


def test_device_memory_of_fsdp_is_the_whole_model_divided_by_the_devices():
    wl, cfg = tiny("gpt3")  # every dimension of tiny gpt3 is a multiple of 4
    n = wl.param_count(cfg)
    one = memory.device_memory(wl, cfg, plan(wl, cfg, MeshShape()), batch_size=4)
    four = memory.device_memory(wl, cfg, plan(wl, cfg, MeshShape(fsdp=4)), batch_size=4)
    pairs = memory.device_memory(wl, cfg, plan(wl, cfg, MeshShape(data=2, tensor=2)), 4)
    assert one.weights == one.gradients == 4 * n
    assert one.optimizer_state == 2 * 4 * n  # Adam's two moments
    assert four.weights == four.gradients == 4 * n // 4
    assert one.activations == 4 * wl.activation_bytes(cfg)
    assert four.activations == wl.activation_bytes(cfg)  # one sequence each
    assert pairs.activations == 2 * wl.activation_bytes(cfg, tensor=2)


def test_lora_holds_gradients_and_state_for_the_adapters_only_and_bf16_base_weights():
    wl, cfg = tiny("llama2_70b_lora")
    held = memory.device_memory(wl, cfg, plan(wl, cfg, MeshShape()), 2, precision="bf16")
    shapes = wl.canonical_shapes(cfg)
    adapters = sum(math.prod(s) for n, s in shapes.items() if ".lora_" in n)
    base = sum(math.prod(s) for n, s in shapes.items() if ".lora_" not in n)
    assert held.gradients == 4 * adapters
    assert held.optimizer_state == 2 * 4 * adapters
    assert held.weights == 4 * adapters + 2 * base


def test_data_parallel_traffic_is_a_ring_all_reduce_of_the_gradients():
    wl, cfg = tiny("gpt3")
    sent = memory.communication(wl, cfg, plan(wl, cfg, MeshShape(data=4)), batch_size=4)
    assert sent == {"data": 2 * 3 / 4 * 4 * wl.param_count(cfg)}


def test_fsdp_traffic_is_two_gathers_and_one_reduce_scatter():
    wl, cfg = tiny("gpt3")
    sent = memory.communication(wl, cfg, plan(wl, cfg, MeshShape(fsdp=2)), 2, "bf16")
    n = wl.param_count(cfg)
    assert sent == {"fsdp": 1 / 2 * (2 * 2 * n + 4 * n)}


def test_a_batch_the_mesh_cannot_split_evenly_is_refused():
    wl, cfg = tiny("gpt3")
    with pytest.raises(ValueError, match="multiple of data x fsdp = 4"):
        memory.device_memory(wl, cfg, plan(wl, cfg, MeshShape(data=2, fsdp=2)), 6)


def test_dlrm_holds_its_embedding_plans_tables_and_sends_dense_gradients_and_lookups():
    from mlperf_tutor.workloads.dlrm import sharding

    wl = workloads.get("dlrm_dcnv2")
    cfg = wl.config("mlperf")
    p = plan(wl, cfg, MeshShape(data=8))
    held = wl.device_memory(cfg, p, cfg.global_batch_size)
    report = sharding.memory_report(cfg, 8)  # weights + Adagrad of tables, MLPs' 12 bytes
    assert held.total == pytest.approx(report["largest device (GB)"] * 1e9, rel=1e-9)
    assert held.gradients == 4 * sum(
        math.prod(s) for n, s in p.shapes.items() if not n.startswith("embedding_bags.")
    )
    sent = wl.communication(cfg, p, cfg.global_batch_size)
    lookups = cfg.global_batch_size / 8 * len(cfg.table_sizes) * cfg.embedding_dim * 4
    assert sent["all-to-all of pooled embeddings"] == 2 * 7 / 8 * lookups
    assert sent["all-reduce of the MLP gradients"] == 2 * 7 / 8 * held.gradients


# --- the command -------------------------------------------------------------------------------
def test_info_mesh_of_gpt3_175b_prints_per_device_memory_and_allocates_nothing():
    tracemalloc.start()
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            args = ["info", "gpt3", "--preset", "mlperf", "--mesh", "data=4,fsdp=8,tensor=8"]
            assert cli.main(args) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = out.getvalue()
    assert "data=4,fsdp=8,tensor=8 (256 devices)" in text
    wl = workloads.get("gpt3")
    n = wl.param_count(wl.config("mlperf"))
    weights = float(next(x for x in text.splitlines() if "per device: weights" in x).split()[-1])
    assert weights == pytest.approx(4 * n / 64 / 1e9, rel=2e-3)  # fp32 masters over 64 slices
    for axis in ("data", "fsdp", "tensor"):
        assert f"sent per step per device, {axis} (GB)" in text
    assert peak < 16e6


def test_info_with_a_bad_mesh_prints_one_error_and_nothing_else(capsys):
    assert cli.main(["info", "gpt3", "--mesh", "tensor=3"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "tensor=3 must divide the attention heads" in err


def test_the_plan_imports_no_framework():
    code = (
        "import sys, mlperf_tutor.parallel as p, mlperf_tutor.parallel.memory as m; "
        "from mlperf_tutor import workloads; wl = workloads.get('gpt3'); cfg = wl.config('tiny'); "
        "m.device_memory(wl, cfg, p.plan(wl, cfg, p.MeshShape(fsdp=2)), 2); "
        "bad = {'torch', 'jax', 'tensorflow', 'keras'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

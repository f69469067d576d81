"""DLRM with sharded embedding tables: the framework-free row-wise plan, and the sharded steps
of PyTorch (2 gloo ranks: row-wise and table-wise tables, DDP MLPs) and JAX (8 simulated
devices as data=4,fsdp=2, and 2: row-wise tables) with their sparse Adagrad, against the
single-device trainers.

Each framework runs once in one subprocess (``dlrm_sharded_torch.py`` under
``torch.distributed.run``, ``dlrm_sharded_jax.py`` with 8 host devices forced before JAX is
imported), both at the same time; the tests assert on the JSON reports they print.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from mlperf_tutor import workloads
from mlperf_tutor.core.parity import OUTPUT_ATOL, STEP_RTOL
from mlperf_tutor.workloads.dlrm.sharding import (
    dense_bytes,
    embedding_plan,
    memory_report,
    row_ranges,
    rows_per_device,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WL = workloads.get("dlrm_dcnv2")
MLPERF = WL.config("mlperf")
TINY = WL.config("tiny")


# --- the framework-free plan ------------------------------------------------------------------
@pytest.mark.parametrize("rows,devices", [(97, 2), (97, 8), (3, 8), (40_000_000, 8), (96, 8)])
def test_row_ranges_cover_every_row_once_in_equal_padded_blocks(rows, devices):
    ranges = row_ranges(rows, devices)
    per = rows_per_device(rows, devices)
    assert per * devices >= rows > (per - 1) * devices  # the least padding of equal blocks
    assert all(r.local_rows == per for r in ranges)
    covered = [i for r in ranges for i in range(r.start, r.stop)] if rows < 1000 else None
    if covered is not None:
        assert covered == list(range(rows))
    assert sum(r.real_rows for r in ranges) == rows
    assert [r.start for r in ranges if r.real_rows] == [
        d * per for d in range(devices) if d * per < rows
    ]


def test_bad_row_splits_are_refused():
    with pytest.raises(ValueError, match="devices must be at least 1"):
        row_ranges(10, 0)
    with pytest.raises(ValueError, match="at least 1 row"):
        row_ranges(0, 2)
    with pytest.raises(ValueError, match="row_wise_above must be >= 0"):
        embedding_plan(TINY, 2, row_wise_above=-1)


@pytest.mark.parametrize("devices", [1, 2, 8, 64])
def test_mixed_plan_counts_every_byte_of_every_table(devices):
    plan = embedding_plan(MLPERF, devices)
    row_bytes = MLPERF.embedding_dim * 8
    for d in range(devices):
        held = sum(plan.local_rows(t, d) for t in range(MLPERF.num_tables)) * row_bytes
        assert plan.device_bytes[d] == held
    for t, rows in enumerate(MLPERF.table_sizes):
        real = sum(plan.ranges[t][d].real_rows for d in range(devices))
        assert real == rows
        if t in plan.row_wise:
            assert plan.table_device[t] is None
        else:
            owner = plan.table_device[t]
            assert plan.ranges[t][owner].local_rows == rows
            assert sum(plan.local_rows(t, d) for d in range(devices)) == rows


def test_mlperf_on_8_devices_splits_the_40m_tables_and_fits_an_h100():
    plan = embedding_plan(MLPERF, 8)
    big = tuple(t for t, rows in enumerate(MLPERF.table_sizes) if rows == 40_000_000)
    assert plan.row_wise == big
    # The five 40M-row tables spread over all 8: 5 x 41 GB / 8 = 25.6 GB each, plus the small
    # tables: no device above 30 GB (table-wise alone puts 41 GB on five devices).
    assert max(plan.device_bytes) < 30e9
    assert plan.imbalance < 1.15
    assert embedding_plan(MLPERF, 8, row_wise_above=float("inf")).row_wise == ()
    assert len(embedding_plan(MLPERF, 8, row_wise_above=0).row_wise) == MLPERF.num_tables


def test_memory_report_of_mlperf_allocates_nothing():
    tracemalloc.start()
    report = memory_report(MLPERF, 8)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000  # bytes: the 105 GB of tables are counted, never allocated
    assert report["devices"] == 8
    per_device = report["embedding GB per device (fp32 weights + Adagrad)"]
    assert len(per_device) == 8
    assert sum(per_device) * 1e9 == pytest.approx(sum(embedding_plan(MLPERF, 8).device_bytes))
    assert report["largest device (GB)"] == pytest.approx(
        max(per_device) + dense_bytes(MLPERF) / 1e9
    )


# --- the sharded steps --------------------------------------------------------------------------
def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _report(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reports() -> tuple[dict, dict]:
    """(torch report, JAX report), the two workers run side by side."""
    torch_run = _start(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(HERE / "dlrm_sharded_torch.py"),
        ]
    )
    jax_run = _start([str(HERE / "dlrm_sharded_jax.py")])
    try:
        return _report(torch_run), _report(jax_run)
    finally:
        for proc in (torch_run, jax_run):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def torch_report(reports) -> dict:
    return reports[0]


@pytest.fixture(scope="module")
def jax_report(reports) -> dict:
    return reports[1]


def _reports(torch_report, jax_report) -> dict[str, dict]:
    return {
        "torch 2 ranks": torch_report,
        **{f"jax {m}": r for m, r in jax_report["meshes"].items()},
    }


@pytest.mark.requires("torch", "jax")
def test_sharded_steps_equal_the_single_device_trainers(torch_report, jax_report):
    assert jax_report["devices"] == 8
    assert set(jax_report["meshes"]) == {"data=4,fsdp=2", "data=2"}
    assert torch_report["row_wise"] and len(torch_report["row_wise"]) < TINY.num_tables
    for name, report in _reports(torch_report, jax_report).items():
        assert report["loss_max_abs"] <= OUTPUT_ATOL, name
        # Every canonical weight, every table included, and the tables' accumulators.
        assert set(report["param_rel"]) == set(WL.canonical_shapes(TINY)), name
        worst = max(report["param_rel"], key=report["param_rel"].get)
        assert report["param_rel"][worst] <= STEP_RTOL, (name, worst)
        assert len(report["accumulator_rel"]) == TINY.num_tables
        assert max(report["accumulator_rel"].values()) <= STEP_RTOL, name


@pytest.mark.requires("torch", "jax")
def test_sparse_update_touches_only_the_rows_the_batch_reads(torch_report, jax_report):
    for name, report in _reports(torch_report, jax_report).items():
        assert report["untouched_rows_bit_identical"], name
        assert report["touched_rows_updated"], name


@pytest.mark.requires("torch", "jax")
def test_each_device_holds_exactly_its_planned_rows(torch_report, jax_report):
    for name, report in _reports(torch_report, jax_report).items():
        assert report["layout_ok"], name


@pytest.mark.requires("torch", "jax")
def test_bad_input_gets_one_clear_error(torch_report, jax_report):
    for refused in (torch_report["refused"], jax_report["refused"]):
        assert refused["id past its table"].startswith("BatchError"), refused
        assert "sparse" in refused["id past its table"]
    refused = jax_report["refused"]
    assert refused["batch not split evenly"].startswith("ValueError: the batch of 15 samples")
    assert refused["mesh of 3 on 8 devices"] == (
        "ValueError: mesh data=3,fsdp=1,tensor=1 needs 3 devices, but there are 8"
    )


@pytest.mark.requires("jax")
def test_mlperf_step_on_8_devices_holds_its_plan_and_gathers_no_table(jax_report):
    # XLA's memory analysis of the JAX step compiled for the mlperf preset (5 tables of 40M
    # rows) on 8 devices, every table row-wise: each device's arguments are its planned rows
    # (weights and Adagrad accumulators) plus the replicated MLPs, their Adagrad state and a
    # batch slice; the step's working memory is a small fraction of one 40M-row table's block
    # (2.56 GB), so no table is gathered; the donated tables are updated in place.
    memory = jax_report["mlperf_step_memory"]
    planned = max(embedding_plan(MLPERF, 8, row_wise_above=0).device_bytes)
    assert planned <= memory["arguments"] <= planned + dense_bytes(MLPERF)
    assert memory["temporaries"] < 0.1 * 40_000_000 // 8 * MLPERF.embedding_dim * 4
    assert memory["aliased"] >= planned

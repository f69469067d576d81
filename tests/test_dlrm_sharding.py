"""Table-wise sharding plans of DLRM's embedding tables."""

import pytest

from mlperf_tutor import workloads
from mlperf_tutor.workloads.dlrm.sharding import table_wise_plan

CFG = workloads.get("dlrm_dcnv2").config("mlperf")


@pytest.mark.parametrize("devices", [1, 8, 64])
def test_plan_places_every_table_once_and_counts_every_byte(devices):
    plan = table_wise_plan(CFG, devices)
    assert len(plan.table_device) == 26 and set(plan.table_device) <= set(range(devices))
    assert sum(plan.device_bytes) == sum(CFG.table_sizes) * 128 * 8
    for device in range(devices):
        rows = sum(
            r for r, d in zip(CFG.table_sizes, plan.table_device, strict=True) if d == device
        )
        assert plan.device_bytes[device] == rows * 128 * 8


def test_the_five_40m_tables_go_to_five_devices_and_bound_the_balance():
    plan = table_wise_plan(CFG, 8)
    big = [t for t, rows in enumerate(CFG.table_sizes) if rows == 40_000_000]
    assert len({plan.table_device[t] for t in big}) == 5
    # A 40M-row table with its accumulator is 41 GB: no table-wise plan over 8 devices can do
    # better than one such table on a device, so the largest device holds exactly that.
    assert max(plan.device_bytes) == 40_000_000 * 128 * 8
    on_h100 = table_wise_plan(CFG, 8, capacity_bytes=40e9)
    assert on_h100.too_large == tuple(big)


def test_one_device_holds_everything_and_bad_device_count_is_refused():
    assert table_wise_plan(CFG, 1).imbalance == 1.0
    with pytest.raises(ValueError, match="devices must be at least 1"):
        table_wise_plan(CFG, 0)

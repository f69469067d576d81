"""Table-wise sharding plans for DLRM's embedding tables (framework-free).

At full size the 26 tables hold 26.1 billion float32 values (105 GB, twice that with Adagrad's
accumulators), more than one accelerator holds. The simplest plan that production systems
start from (TorchRec's ``TABLE_WISE`` sharding type, one table per device; JAX with each table
placed by a ``NamedSharding`` on one device; TF's ``TPUEmbedding`` places tables on cores the
same way) gives every table to one device and balances the bytes. Tables larger than a device
are split further by rows (TorchRec ``ROW_WISE``) or columns (``COLUMN_WISE``); this module
plans the table-wise part and says which tables do not fit.
"""

from __future__ import annotations

import dataclasses

from mlperf_tutor.workloads.dlrm.config import DlrmConfig


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Device of every table and the bytes each device holds.

    Attributes:
        devices: number of devices.
        table_device: table index -> device index.
        device_bytes: bytes of weights and optimizer state per device.
        too_large: tables larger than ``capacity_bytes`` (they need row- or column-wise splits).
    """

    devices: int
    table_device: tuple[int, ...]
    device_bytes: tuple[int, ...]
    too_large: tuple[int, ...]

    @property
    def imbalance(self) -> float:
        """Largest device's bytes over the mean (1.0: perfectly balanced)."""
        mean = sum(self.device_bytes) / self.devices
        return max(self.device_bytes) / mean if mean else 1.0


def table_wise_plan(
    cfg: DlrmConfig,
    devices: int,
    bytes_per_value: int = 8,
    capacity_bytes: float = float("inf"),
) -> ShardingPlan:
    """Greedy table-wise plan: tables from largest to smallest, each to the device holding the
    fewest bytes so far (the longest-processing-time rule, within 4/3 of the best balance).

    Args:
        cfg: the DLRM config (table sizes and embedding dim).
        devices: number of devices (at least 1).
        bytes_per_value: bytes per embedding value: 8 for float32 weights plus a float32
            Adagrad accumulator.
        capacity_bytes: memory a device can give to embeddings; larger tables are listed in
            ``too_large`` (and still placed, so the plan is complete).
    """
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    sizes = [rows * cfg.embedding_dim * bytes_per_value for rows in cfg.table_sizes]
    loads = [0] * devices
    owner = [0] * len(sizes)
    for table in sorted(range(len(sizes)), key=lambda t: (-sizes[t], t)):
        device = min(range(devices), key=lambda d: (loads[d], d))
        owner[table] = device
        loads[device] += sizes[table]
    too_large = tuple(t for t, size in enumerate(sizes) if size > capacity_bytes)
    return ShardingPlan(devices, tuple(owner), tuple(loads), too_large)

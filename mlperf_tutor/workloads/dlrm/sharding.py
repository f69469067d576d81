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
import math

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


# --- row-wise and mixed plans ----------------------------------------------------------------
# float32 weights plus float32 Adagrad accumulators: 8 bytes per embedding value.
ADAGRAD_BYTES_PER_VALUE = 8


@dataclasses.dataclass(frozen=True)
class RowRange:
    """The rows of one table that one device holds.

    Attributes:
        start: first global row id.
        stop: one past the last real row id (``start`` when the device holds only padding).
        local_rows: rows the device stores (its slice of the padded table; padding included).
    """

    start: int
    stop: int
    local_rows: int

    @property
    def real_rows(self) -> int:
        """Rows of the table (not padding) on the device."""
        return self.stop - self.start


def rows_per_device(rows: int, devices: int) -> int:
    """Rows every device stores of a ``rows``-row table split row-wise over ``devices``:
    ``ceil(rows / devices)``.

    The padding rule: the table is padded at its end to ``devices * rows_per_device`` rows, so
    that every device holds an equal block (the frameworks' sharded arrays need equal blocks;
    TorchRec pads its ``ROW_WISE`` shards the same way). Padding rows are zero, no id reaches
    them, and they never get a gradient.
    """
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if rows < 1:
        raise ValueError(f"a table needs at least 1 row, got {rows}")
    return -(-rows // devices)


def row_ranges(rows: int, devices: int) -> tuple[RowRange, ...]:
    """Device d's rows of a ``rows``-row table split row-wise: the block
    ``[d * per, (d + 1) * per)`` of the padded table, ``per`` = :func:`rows_per_device`; the
    real rows are that block cut at ``rows``."""
    per = rows_per_device(rows, devices)
    return tuple(
        RowRange(min(d * per, rows), min((d + 1) * per, rows), per) for d in range(devices)
    )


@dataclasses.dataclass(frozen=True)
class EmbeddingPlan:
    """How every table is sharded over ``devices``: row-wise over all of them, or table-wise
    on one, and the bytes each device holds.

    Attributes:
        devices: number of devices.
        row_wise: indices of the tables split row-wise over every device.
        table_device: table index -> its device for a table-wise table, None for a row-wise one.
        ranges: table index -> per device, its :class:`RowRange` (a table-wise table: all rows
            on its device, an empty range with 0 local rows elsewhere).
        device_bytes: per device, bytes of embedding weights and Adagrad accumulators.
        bytes_per_value: bytes per embedding value the plan counted.
    """

    devices: int
    row_wise: tuple[int, ...]
    table_device: tuple[int | None, ...]
    ranges: tuple[tuple[RowRange, ...], ...]
    device_bytes: tuple[int, ...]
    bytes_per_value: int

    def local_rows(self, table: int, device: int) -> int:
        """Rows (padding included) of ``table`` that ``device`` stores."""
        return self.ranges[table][device].local_rows

    @property
    def imbalance(self) -> float:
        """Largest device's bytes over the mean (1.0: perfectly balanced)."""
        mean = sum(self.device_bytes) / self.devices
        return max(self.device_bytes) / mean if mean else 1.0


def embedding_plan(
    cfg: DlrmConfig,
    devices: int,
    *,
    row_wise_above: float | None = None,
    bytes_per_value: int = ADAGRAD_BYTES_PER_VALUE,
) -> EmbeddingPlan:
    """The mixed plan: large tables row-wise over every device, the others table-wise.

    A table goes row-wise when its bytes (weights and Adagrad accumulators) exceed
    ``row_wise_above``; by default that is one device's fair share of all tables,
    ``total / devices``: such a table would on its own unbalance a table-wise plan (the
    ``mlperf`` preset's five 40M-row tables, 41 GB each, on any number of devices above 5).
    Row-wise tables load every device equally; the table-wise ones then go, largest first, to
    the device holding the fewest bytes (as :func:`table_wise_plan`). ``row_wise_above=0``
    splits every table row-wise; ``float("inf")`` none.

    Args:
        cfg: the DLRM config.
        devices: number of devices (at least 1).
        row_wise_above: bytes above which a table is split row-wise (see above).
        bytes_per_value: bytes per embedding value (8: float32 weight and accumulator).

    Raises:
        ValueError: fewer than 1 device, or a negative threshold.
    """
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    sizes = [rows * cfg.embedding_dim * bytes_per_value for rows in cfg.table_sizes]
    if row_wise_above is None:
        row_wise_above = sum(sizes) / devices
    if row_wise_above < 0:
        raise ValueError(f"row_wise_above must be >= 0, got {row_wise_above}")
    row_bytes = cfg.embedding_dim * bytes_per_value
    row_wise = tuple(t for t, size in enumerate(sizes) if size > row_wise_above)
    loads = [0] * devices
    ranges: list[tuple[RowRange, ...] | None] = [None] * len(sizes)
    owner: list[int | None] = [None] * len(sizes)
    for t in row_wise:
        ranges[t] = row_ranges(cfg.table_sizes[t], devices)
        for d in range(devices):
            loads[d] += ranges[t][d].local_rows * row_bytes
    rest = [t for t in range(len(sizes)) if t not in row_wise]
    for t in sorted(rest, key=lambda t: (-sizes[t], t)):
        device = min(range(devices), key=lambda d: (loads[d], d))
        owner[t] = device
        loads[device] += sizes[t]
        rows = cfg.table_sizes[t]
        ranges[t] = tuple(
            RowRange(0, rows, rows) if d == device else RowRange(0, 0, 0) for d in range(devices)
        )
    return EmbeddingPlan(
        devices, row_wise, tuple(owner), tuple(ranges), tuple(loads), bytes_per_value
    )


def check_sparse_optimizer(spec) -> None:
    """Refuse an optimizer the sparse row update cannot apply: it is Adagrad without weight
    decay or clipping (the workload's), which leaves the rows a batch does not read alone.

    Raises:
        ValueError: any other optimizer ``spec`` (an OptimizerSpec).
    """
    if spec.name != "adagrad" or spec.weight_decay or spec.clip_norm is not None:
        raise ValueError(
            "the sparse row update is Adagrad without weight decay or clipping (the "
            f"workload's optimizer); got {spec}"
        )


def dense_bytes(cfg: DlrmConfig, bytes_per_value: int = 12) -> int:
    """Bytes of the MLPs and cross layers on every device (data parallel: each holds all of
    them): float32 weight, gradient and Adagrad accumulator, 12 bytes per value."""
    from mlperf_tutor.workloads.dlrm import canonical_shapes

    values = sum(
        math.prod(shape)
        for name, shape in canonical_shapes(cfg).items()
        if not name.startswith("embedding_bags.")
    )
    return values * bytes_per_value


def memory_report(
    cfg: DlrmConfig, devices: int, *, row_wise_above: float | None = None
) -> dict[str, object]:
    """Per-device memory of training ``cfg`` sharded over ``devices`` with
    :func:`embedding_plan`, from the config's numbers alone (nothing allocated): what
    ``mlperf-tutor info --mesh`` prints.

    Activations and the gathered rows of a batch are not counted (they depend on the batch
    size per device, not on the plan).
    """
    plan = embedding_plan(cfg, devices, row_wise_above=row_wise_above)
    dense = dense_bytes(cfg)
    per_device = [b + dense for b in plan.device_bytes]
    return {
        "devices": devices,
        "row-wise tables": list(plan.row_wise),
        "table-wise tables": sum(d is not None for d in plan.table_device),
        "embedding GB per device (fp32 weights + Adagrad)": [b / 1e9 for b in plan.device_bytes],
        "dense GB per device (replicated weights, grads, Adagrad)": dense / 1e9,
        "largest device (GB)": max(per_device) / 1e9,
        "imbalance (largest / mean)": plan.imbalance,
    }

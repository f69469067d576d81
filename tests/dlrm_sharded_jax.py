"""Worker of tests/test_dlrm_sharded.py: DLRM tiny with row-wise sharded tables and the sparse
Adagrad on 8 simulated CPU devices (and on 2 of them) against the single-device JAX trainer.

Run as a script (the device count must be set before JAX is imported); prints one JSON report
on its last line, which the test functions assert on.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mlperf_tutor import frameworks  # noqa: E402
from mlperf_tutor.core.parity import errors  # noqa: E402
from mlperf_tutor.parallel.plan import MeshShape  # noqa: E402
from mlperf_tutor.workloads.dlrm import WORKLOAD as WL  # noqa: E402
from mlperf_tutor.workloads.dlrm.data import bag_offsets  # noqa: E402
from mlperf_tutor.workloads.dlrm.jax_sharded import (  # noqa: E402
    ShardedTrainer,
    make_mesh,
    step_memory,
)
from mlperf_tutor.workloads.dlrm.sharding import row_ranges  # noqa: E402

STEPS = 10
BATCH = 16
fj = frameworks.get("jax")


def rel(a, b) -> float:
    """The parity bar's relative error of ``a`` against ``b``: ||a - b|| / ||b||."""
    return errors(a, b)[1]


def touched(cfg, batch) -> list[np.ndarray]:
    """Per table, a boolean mask of the rows the batch's bags hold."""
    off = bag_offsets(cfg.multi_hot_sizes)
    masks = []
    for f, rows in enumerate(cfg.table_sizes):
        mask = np.zeros(rows, bool)
        mask[batch["sparse"][:, off[f] : off[f + 1]].ravel()] = True
        masks.append(mask)
    return masks


def main() -> dict:
    fj.pin_precision()
    cfg = WL.deterministic(WL.config("tiny"))
    spec, schedule = WL.optimizer(cfg)
    weights = WL.parity_weights(cfg)
    batches = [WL.synthetic_batch(cfg, BATCH, seed=s) for s in range(STEPS)]

    ref = fj.Trainer(WL.build("jax", cfg, weights), spec, schedule)
    ref_losses = [float(ref.step(b)) for b in batches]
    ref_weights = ref.weights()
    ref_state = ref.optimizer_state()

    report = {"devices": len(jax.devices()), "meshes": {}}
    for text, n in (("data=4,fsdp=2", 8), ("data=2", 2)):
        mesh = make_mesh(MeshShape.parse(text), jax.devices()[:n])
        tr = ShardedTrainer(WL.build("jax", cfg, weights), cfg, spec, schedule, mesh)
        out = {}
        # Each device holds exactly its planned rows: the padded table's block d.
        layout_ok = True
        for f, table in enumerate(tr.tables):
            ranges = row_ranges(cfg.table_sizes[f], n)
            device_index = {d: i for i, d in enumerate(mesh.devices.flat)}
            for shard in table.addressable_shards:
                r = ranges[device_index[shard.device]]
                sl = shard.index[0]
                block = (sl.start or 0, sl.stop)
                want = np.zeros((r.local_rows, cfg.embedding_dim), np.float32)
                want[: r.real_rows] = weights[f"embedding_bags.{f}.weight"][r.start : r.stop]
                d = device_index[shard.device]
                layout_ok &= block == (d * r.local_rows, (d + 1) * r.local_rows)
                layout_ok &= shard.data.shape == (r.local_rows, cfg.embedding_dim)
                layout_ok &= bool(np.array_equal(np.asarray(shard.data), want))
            layout_ok &= len(table.addressable_shards) == n
        out["layout_ok"] = bool(layout_ok)

        losses, untouched_same, touched_changed = [], True, True
        for b in batches:
            before_t = [np.asarray(t) for t in tr.tables]
            before_s = [np.asarray(s) for s in tr.accumulators]
            losses.append(float(tr.step(b)))
            for f, mask in enumerate(touched(cfg, b)):
                pad = np.zeros(len(before_t[f]), bool)
                pad[: len(mask)] = mask
                after_t, after_s = np.asarray(tr.tables[f]), np.asarray(tr.accumulators[f])
                untouched_same &= bool(np.array_equal(after_t[~pad], before_t[f][~pad]))
                untouched_same &= bool(np.array_equal(after_s[~pad], before_s[f][~pad]))
                # A touched row gets a nonzero squared gradient in its accumulator.
                touched_changed &= bool((after_s[pad] != before_s[f][pad]).any())
        out["untouched_rows_bit_identical"] = untouched_same
        out["touched_rows_updated"] = touched_changed
        out["loss_max_abs"] = float(np.abs(np.subtract(losses, ref_losses)).max())
        got = tr.weights()
        out["param_rel"] = {k: rel(got[k], ref_weights[k]) for k in ref_weights}
        sums = tr.table_accumulators()
        out["accumulator_rel"] = {k: rel(v, ref_state[f"sum/{k}"]) for k, v in sums.items()}
        report["meshes"][text] = out
    report["refused"] = refusals(cfg, tr, batches[0])
    # The mlperf preset's step on 8 devices, compiled for abstract arrays (nothing allocated).
    mlperf = WL.config("mlperf")
    mesh = make_mesh(MeshShape.parse("data=8"))
    report["mlperf_step_memory"] = step_memory(mlperf, *WL.optimizer(mlperf), mesh, 64)
    return report


def refusals(cfg, tr, batch) -> dict[str, str]:
    """The error each bad input gets (its type and message; "none" if it was accepted)."""
    bad_id = dict(batch, sparse=batch["sparse"].copy())
    bad_id["sparse"][0, 0] = cfg.table_sizes[0]  # one past table 0
    odd = {k: v[:15] for k, v in batch.items()}  # 15 samples over 2 batch shards
    cases = {
        "id past its table": lambda: tr.step(bad_id),
        "batch not split evenly": lambda: tr.step(odd),
        "mesh of 3 on 8 devices": lambda: make_mesh(MeshShape(data=3)),
    }
    out = {}
    for name, case in cases.items():
        try:
            case()
            out[name] = "none"
        except Exception as e:  # noqa: BLE001 - the report names whatever was raised
            out[name] = f"{type(e).__name__}: {e}"
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
    sys.stdout.flush()

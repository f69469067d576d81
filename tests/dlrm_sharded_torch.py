"""Worker of tests/test_dlrm_sharded.py: DLRM tiny with row-wise and table-wise sharded tables
and the sparse Adagrad on 2 gloo ranks against the single-device PyTorch trainer.

Launched by ``torch.distributed.run --nproc-per-node 2``; rank 0 prints one JSON report on its
last line, which the test functions assert on.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mlperf_tutor import frameworks
from mlperf_tutor.core.parity import errors
from mlperf_tutor.workloads.dlrm import WORKLOAD as WL
from mlperf_tutor.workloads.dlrm.data import bag_offsets
from mlperf_tutor.workloads.dlrm.sharding import embedding_plan
from mlperf_tutor.workloads.dlrm.torch_sharded import ShardedTrainer

STEPS = 10
BATCH = 16
ft = frameworks.get("torch")


def rel(a, b) -> float:
    """The parity bar's relative error of ``a`` against ``b``: ||a - b|| / ||b||."""
    return errors(a, b)[1]


def all_ranks(flag: bool) -> bool:
    """``flag`` held on every rank."""
    t = torch.tensor(int(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def main() -> dict | None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("rows",))
    ft.pin_precision()
    cfg = WL.deterministic(WL.config("tiny"))
    spec, schedule = WL.optimizer(cfg)
    weights = WL.parity_weights(cfg)
    batches = [WL.synthetic_batch(cfg, BATCH, seed=s) for s in range(STEPS)]
    # Tables above 50 rows row-wise, the rest table-wise: both kinds in one model.
    plan = embedding_plan(cfg, world, row_wise_above=50 * cfg.embedding_dim * 8)
    tr = ShardedTrainer(WL.build("torch", cfg, weights), cfg, spec, schedule, mesh, plan)

    layout_ok = True
    for f in range(cfg.num_tables):
        block = plan.ranges[f][rank]
        shard = tr.shards[f].detach()
        want = weights[f"embedding_bags.{f}.weight"][block.start : block.stop]
        layout_ok &= tuple(shard.shape) == (block.local_rows, cfg.embedding_dim)
        layout_ok &= bool(np.array_equal(shard[: block.real_rows].numpy(), want))
        layout_ok &= bool((shard[block.real_rows :] == 0).all())
        if f in plan.row_wise:
            dt = tr.sharded[f]
            layout_ok &= dt.to_local().data_ptr() == tr.shards[f].data_ptr()
            layout_ok &= tuple(dt.shape) == (world * block.local_rows, cfg.embedding_dim)
    layout_ok = all_ranks(layout_ok)

    off = bag_offsets(cfg.multi_hot_sizes)
    local = BATCH // world
    losses, untouched_same, touched_changed = [], True, True
    for b in batches:
        before = [(p.detach().clone(), tr.accumulator(f).clone()) for f, p in enumerate(tr.shards)]
        mine = {k: v[rank * local : (rank + 1) * local] for k, v in b.items()}
        losses.append(float(tr.step(mine)))
        for f, (p0, s0) in enumerate(before):
            block = plan.ranges[f][rank]
            mask = np.zeros(block.local_rows, bool)
            ids = b["sparse"][:, off[f] : off[f + 1]].ravel()
            ids = ids[(ids >= block.start) & (ids < block.stop)] - block.start
            mask[ids] = True
            m = torch.from_numpy(mask)
            p1, s1 = tr.shards[f].detach(), tr.accumulator(f)
            untouched_same &= bool(torch.equal(p1[~m], p0[~m]) and torch.equal(s1[~m], s0[~m]))
            if mask.any():
                touched_changed &= bool((s1[m] != s0[m]).any())
    untouched_same, touched_changed = all_ranks(untouched_same), all_ranks(touched_changed)
    got = tr.weights()
    sums = {
        f"embedding_bags.{f}.weight": ft.to_numpy(tr.full_table(f, accumulator=True))
        for f in range(cfg.num_tables)
    }
    bad = dict(batches[0], sparse=batches[0]["sparse"].copy())
    bad["sparse"][0, 0] = cfg.table_sizes[0]  # one past table 0
    try:
        tr.step({k: v[rank * local : (rank + 1) * local] for k, v in bad.items()})
        refused = "none"
    except Exception as e:  # noqa: BLE001 - the report names whatever was raised
        refused = f"{type(e).__name__}: {e}"
    if rank != 0:
        return None
    ref = ft.Trainer(WL.build("torch", cfg, weights), spec, schedule)
    ref_losses = [float(ref.step(b)) for b in batches]
    ref_weights, ref_state = ref.weights(), ref.optimizer_state()
    return {
        "world": world,
        "row_wise": list(plan.row_wise),
        "layout_ok": layout_ok,
        "refused": {"id past its table": refused},
        "untouched_rows_bit_identical": untouched_same,
        "touched_rows_updated": touched_changed,
        "loss_max_abs": float(np.abs(np.subtract(losses, ref_losses)).max()),
        "param_rel": {k: rel(got[k], ref_weights[k]) for k in ref_weights},
        "accumulator_rel": {k: rel(v, ref_state[f"sum/{k}"]) for k, v in sums.items()},
    }


if __name__ == "__main__":
    report = main()
    dist.destroy_process_group()
    if report is not None:
        print(json.dumps(report))
        sys.stdout.flush()

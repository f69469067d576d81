"""Worker of tests/test_parallel_torch.py: one group of gloo processes, every check of its
meshes, one JSON report.

``python tests/parallel_torch_worker.py MESHES NPROC OUT WORKDIR [--save] [--load] WORKLOAD...``
spawns NPROC processes (CPU, gloo) once; MESHES ("fsdp=2;tensor=2") are built in turn over that
one process group (a mesh written "data=2,fsdp=2@gpt3" runs only the workloads named after @).
For each mesh and workload, rank 0 trains the single-device ``frameworks.torch.Trainer`` and
every rank a ``parallel.torch.ShardedTrainer`` from the same weights on the same global
batches; the report holds the losses and weight differences (rank 0), each rank's local shard
shapes against the plan's, whether every rank gathered the same full weights, and for the first
workload the DCP checks: ``--save`` writes a checkpoint and its gathered state under WORKDIR (on
the first mesh), ``--load`` restores the one a previous launch wrote (on another mesh) and
compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

STEPS = 10
GLOBAL_BATCH = 4
# Tiny configs with a learning rate that moves the weights visibly in 10 steps (the presets'
# warm-up would keep the first updates near zero, which no sharding error could show in).
OVERRIDES = {
    "gpt3": {"seq_len": 16, "lr": 2e-3, "warmup_steps": 0},
    "llama2_70b_lora": {"seq_len": 16, "lr": 3e-3},
    "bert": {"warmup_steps": 0},
}


def batches(wl, cfg, name: str) -> list[dict]:
    """STEPS global batches; labels (BERT: masked positions) of example 0 partly dropped, so
    that the slices hold different counts of labelled tokens (the loss must still be the global
    batch's)."""
    from mlperf_tutor.layers.spec import IGNORE_INDEX

    out = []
    for step in range(STEPS):
        batch = wl.synthetic_batch(cfg, GLOBAL_BATCH, seed=step)
        if "labels" in batch:
            batch["labels"] = batch["labels"].copy()
            batch["labels"][0, 3:] = IGNORE_INDEX
        if "masked_lm_positions" in batch:  # position 0 ([CLS]) marks padding
            batch["masked_lm_positions"] = batch["masked_lm_positions"].copy()
            batch["masked_lm_positions"][0, 2:] = 0
        out.append(batch)
    return out


def digest(tree: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tree):
        h.update(k.encode())
        h.update(np.ascontiguousarray(tree[k]).tobytes())
    return h.hexdigest()


def relative(a: dict, b: dict) -> dict:
    """Per key, max |a - b| / max |b| (0 when both are all zero)."""
    out = {}
    for k in b:
        diff = float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) if b[k].size else 0.0
        scale = float(np.max(np.abs(b[k]))) if b[k].size else 0.0
        out[k] = diff / scale if scale else diff
    return out


def run_workload(name, mesh_shape, dmesh, rank, report, workdir, save, load, first, refs):
    import torch.distributed as dist

    from mlperf_tutor.frameworks.torch import Trainer
    from mlperf_tutor.parallel import torch as ptorch
    from mlperf_tutor.parallel.plan import plan
    from mlperf_tutor.workloads import get

    wl = get(name)
    cfg = wl.deterministic(wl.config("tiny", **OVERRIDES[name]))
    spec, schedule = wl.optimizer(cfg)
    weights = wl.init_canonical(cfg, seed=0)
    the_plan = plan(wl, cfg, mesh_shape)
    data = batches(wl, cfg, name)
    entry = report.setdefault(name, {})

    model = wl.build("torch", cfg, weights=weights)
    trainer = ptorch.ShardedTrainer(
        model, spec, schedule, the_plan, dmesh, terms=wl.loss_terms(cfg)
    )
    shapes = ptorch.local_shard_shapes(trainer.model)
    departures = set(ptorch.fsdp_departures(the_plan))
    wrong = {}
    for param, shape in shapes.items():
        want = the_plan.shard_shape(param)
        if param in departures:  # FSDP2 shards it on dim 0 all the same (padded chunks)
            continue
        if tuple(shape) != tuple(want):
            wrong[param] = [list(shape), list(want)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, wrong)
    entry["shape_mismatches"] = {f"rank{r}": w for r, w in enumerate(everyone) if w}
    entry["checked_shapes"] = len(shapes) - len(departures & set(shapes))
    entry["fsdp_departures"] = sorted(departures & set(shapes))
    entry["engine"] = type(trainer._forward).__name__
    entry["split_shapes"] = sum(
        1 for p, s in shapes.items() if tuple(s) != tuple(the_plan.shapes[p])
    )

    losses = [trainer.loss_value(trainer.step(b)) for b in data]
    final = trainer.weights()
    state = trainer.optimizer_state()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest(final) + digest(state))
    entry["same_on_every_rank"] = len(set(digests)) == 1

    if rank == 0:
        if name not in refs:  # the single-device run, once per launch
            ref = Trainer(wl.build("torch", cfg, weights=weights), spec, schedule)
            ref_losses = [ref.loss_value(ref.step(b)) for b in data]
            refs[name] = (ref_losses, ref.weights(), ref.optimizer_state())
        ref_losses, ref_weights, ref_state = refs[name]
        entry["loss_max_abs"] = float(np.max(np.abs(np.array(losses) - ref_losses)))
        errors = relative(final, ref_weights)
        entry["param_max_rel"] = max(errors.values())
        entry["param_worst"] = max(errors, key=errors.get)
        entry["param_moved_rel"] = max(relative(ref_weights, weights).values())
        entry["opt_max_rel"] = max(relative({k: state[k] for k in ref_state}, ref_state).values())
        entry["losses"] = losses
        entry["ref_losses"] = ref_losses

    if first and save:
        ckpt = Path(workdir) / f"ckpt_{name}"
        if rank == 0:
            ckpt.mkdir()
            np.savez(Path(workdir) / f"saved_{name}.npz", **final)
            np.savez(Path(workdir) / f"saved_opt_{name}.npz", **state)
        dist.barrier()
        trainer.save(ckpt)
        entry["saved"] = str(mesh_shape)
    if first and load:
        ckpt = Path(workdir) / f"ckpt_{name}"
        other = ptorch.ShardedTrainer(
            wl.build("torch", cfg, weights=wl.init_canonical(cfg, seed=1)),
            spec,
            schedule,
            the_plan,
            dmesh,
            terms=wl.loss_terms(cfg),
        )
        other.restore(ckpt)
        restored, restored_state = other.weights(), other.optimizer_state()
        saved = dict(np.load(Path(workdir) / f"saved_{name}.npz"))
        saved_state = dict(np.load(Path(workdir) / f"saved_opt_{name}.npz"))
        entry["restored_weights_equal"] = sorted(saved) == sorted(restored) and all(
            np.array_equal(saved[k], restored[k]) for k in saved
        )
        entry["restored_state_equal"] = sorted(saved_state) == sorted(restored_state) and all(
            np.array_equal(saved_state[k], restored_state[k]) for k in saved_state
        )
        entry["restored_steps"] = other.steps


def bad_meshes(rank, report):
    from mlperf_tutor.parallel import torch as ptorch
    from mlperf_tutor.parallel.plan import MeshShape, ParallelError

    try:
        ptorch.device_mesh(MeshShape(fsdp=8))
        report["bad_world"] = None
    except ParallelError as e:
        report["bad_world"] = str(e)


def bf16_check(mesh_shape, dmesh, report):
    """The mixed-precision policy constructs and trains (2 steps, finite losses)."""
    from mlperf_tutor.parallel import torch as ptorch
    from mlperf_tutor.parallel.plan import plan
    from mlperf_tutor.workloads import get

    wl = get("gpt3")
    cfg = wl.deterministic(wl.config("tiny", **OVERRIDES["gpt3"]))
    spec, schedule = wl.optimizer(cfg)
    trainer = ptorch.ShardedTrainer(
        wl.build("torch", cfg),
        spec,
        schedule,
        plan(wl, cfg, mesh_shape),
        dmesh,
        terms=wl.loss_terms(cfg),
        precision="bf16",
    )
    seen = []  # the dtype fc_in computes with: FSDP2 gathers its weight in bf16
    layer = trainer.model.blocks[0].mlp.fc_in
    layer.register_forward_pre_hook(lambda module, args: seen.append(str(module.weight.dtype)))
    data = batches(wl, cfg, "gpt3")[:2]
    report["bf16_losses"] = [trainer.loss_value(trainer.step(b)) for b in data]
    report["bf16_compute_dtypes"] = sorted(set(seen))
    report["bf16_param_dtypes"] = sorted({str(p.dtype) for p in trainer.model.parameters()})


def worker(rank, world, mesh_text, rendezvous, out, workdir, save, load, names):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    report: dict = {"rank": rank}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world
        )
        from mlperf_tutor.parallel import torch as ptorch
        from mlperf_tutor.parallel.plan import MeshShape

        bad_meshes(rank, report)
        refs: dict = {}
        for number, item in enumerate(mesh_text.split(";")):
            text, _, only = item.partition("@")
            mesh_shape = MeshShape.parse(text)
            dmesh = ptorch.device_mesh(mesh_shape)
            entry = report.setdefault(text, {})
            for i, name in enumerate(names):
                if name == "bert" and mesh_shape.tensor > 1:
                    continue  # see the report: BERT's tied MLM head has no tensor plan here
                if only and name not in only.split("+"):
                    continue
                # The checkpoint: written on the launch's first mesh, read on every mesh.
                args = (rank, entry, workdir, save and number == 0, load, i == 0, refs)
                run_workload(name, mesh_shape, dmesh, *args)
            if mesh_shape.fsdp > 1 and mesh_shape.tensor == 1:
                bf16_check(mesh_shape, dmesh, entry)
            dist.barrier()
    except Exception:
        report["error"] = traceback.format_exc()
    Path(f"{out}.{rank}").write_text(json.dumps(report))


def main(argv: list[str]) -> None:
    import torch.multiprocessing as mp

    flags = {a for a in argv if a.startswith("--")}
    args = [a for a in argv if not a.startswith("--")]
    mesh_text, nproc, out, workdir, *names = args
    nproc = int(nproc)
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous = os.path.join(tmp, "rendezvous")
        mp.start_processes(
            worker,
            args=(
                nproc,
                mesh_text,
                rendezvous,
                out,
                workdir,
                "--save" in flags,
                "--load" in flags,
                names,
            ),
            nprocs=nproc,
            start_method="spawn",
        )
    reports = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]
    merged = reports[0]
    merged["errors"] = [r["error"] for r in reports if "error" in r]
    Path(out).write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])

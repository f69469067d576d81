"""Every check of ``test_parallel_jax.py`` in one process with 8 simulated CPU devices.

JAX reads ``XLA_FLAGS`` once, when it is imported, and the test suite's own process must keep
one device: so the checks run here, in a subprocess, and print one JSON report that the tests
assert on. Each (workload, mesh) is compiled once: the single-device reference and every sharded
trainer take ``STEPS`` steps from the same weights and batches.

Usage: ``python tests/parallel_jax_worker.py DIRECTORY CASES_JSON``, CASES_JSON being
``{"workloads": WORKLOADS, "reshard": RESHARD}`` of ``test_parallel_jax.py`` (which explains
them); DIRECTORY receives the checkpoints.
"""

from __future__ import annotations

import os
import sys

DEVICES = 8
# 8 host devices; and LLVM's cheaper optimisation level: a third less compile time (the test's
# budget is mostly compilation), the same code for the single-device and the sharded step.
FLAGS = (
    f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAGS}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: checks

import checks  # noqa: E402

import mlperf_tutor as mt  # noqa: E402
from mlperf_tutor import frameworks  # noqa: E402
from mlperf_tutor.parallel import MeshShape, ParallelError, plan  # noqa: E402
from mlperf_tutor.parallel import jax as pj  # noqa: E402

fj = frameworks.get("jax")
STEPS = 10
BATCH = 8  # divisible by every mesh's data x fsdp
WORKLOADS: dict = {}  # name -> (config overrides, meshes): test_parallel_jax.WORKLOADS
RESHARD: dict = {}  # name -> (saved mesh, Orbax targets, canonical target): ...RESHARD


def config(name: str):
    wl = mt.workloads.get(name)
    return wl, wl.deterministic(wl.config("tiny", **WORKLOADS[name][0]))


def initial_weights(name: str) -> dict:
    wl, cfg = config(name)
    if name == "llama2_70b_lora":  # adapters that change the output, so lora_a learns too
        return checks.lively_lora(wl, cfg)
    return wl.init_canonical(cfg, seed=0)


def trainer(name: str, mesh_text: str | None, weights: dict):
    wl, cfg = config(name)
    model = wl.build("jax", cfg, weights=weights)
    the_plan = None if mesh_text is None else plan(wl, cfg, MeshShape.parse(mesh_text))
    return fj.Trainer(model, *wl.optimizer(cfg), plan=the_plan)


def relative(got: dict, want: dict) -> float:
    """The largest ``max|got - want| / max|want|`` over the arrays of two trees."""
    worst = 0.0
    for key, value in want.items():
        scale = float(np.abs(value.astype(np.float64)).max()) or 1.0
        worst = max(worst, checks.max_abs(got[key], value) / scale)
    return worst


def identical(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(
        got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes() for k in want
    )


def spec_entries(array) -> list:
    """The PartitionSpec of a sharded array, one JSON entry per dimension (None, an axis name
    or a list of names)."""
    spec = list(array.sharding.spec) + [None] * (array.ndim - len(array.sharding.spec))
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def shard_report(t) -> dict:
    """Parameters whose local shard is not the plan's, and optimizer slots not sharded like
    their parameter (both empty when all is well), and how many were checked."""
    shapes = pj.local_shard_shapes(t)
    wrong = {
        name: [list(shapes[name]), list(t.plan.shard_shape(name))]
        for name in t.plan.shapes
        if shapes[name] != t.plan.shard_shape(name)
    }
    params = {leaf.name: leaf.variable.get_value() for leaf in fj._leaves(t.model)}
    slots = []
    for path, value in jax.tree_util.tree_flatten_with_path(t._opt.opt_state)[0]:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names and names[-1] in params:
            if not value.sharding.is_equivalent_to(params[names[-1]].sharding, value.ndim):
                slots.append(f"{jax.tree_util.keystr(path)}")
    split = sum(any(part) for part in t.plan.partitions.values())
    # Each leaf's PartitionSpec in its own (JAX) layout, and its layout permutation.
    specs = {leaf.name: spec_entries(leaf.variable.get_value()) for leaf in fj._leaves(t.model)}
    return {
        "wrong_shapes": wrong,
        "wrong_slots": slots,
        "checked": len(shapes),
        "split": split,
        "specs": specs,
    }


def run(name: str, report: dict, directory: Path) -> None:
    weights = initial_weights(name)
    wl, cfg = config(name)
    batches = [wl.synthetic_batch(cfg, batch_size=BATCH, seed=1 + i) for i in range(STEPS)]
    ref = trainer(name, None, weights)
    ref_losses = np.array([ref.loss_value(ref.step(b)) for b in batches])
    ref_weights, ref_opt = ref.weights(), ref.optimizer_state()
    out = report.setdefault(name, {"parity": {}, "shards": {}, "donated": {}, "reshard": {}})
    for mesh_text in WORKLOADS[name][1]:
        t = trainer(name, mesh_text, weights)
        out["shards"][mesh_text] = shard_report(t)
        if mesh_text == "data=8":  # refused before anything is compiled
            out["uneven_batch"] = error(
                lambda t=t: t.step(wl.synthetic_batch(cfg, batch_size=BATCH // 2))
            )
        before = next(iter(t._params.values()))
        losses = [t.step(batches[0])]
        out["donated"][mesh_text] = before.is_deleted()
        losses += [t.step(b) for b in batches[1:]]
        losses = np.array([t.loss_value(h) for h in losses])
        got_weights = t.weights()
        out["parity"][mesh_text] = {
            "loss_max_abs": checks.max_abs(losses, ref_losses),
            "params_relative": relative(got_weights, ref_weights),
            "optimizer_relative": relative(t.optimizer_state(), ref_opt),
            "changed": relative(got_weights, weights),  # the steps moved the weights
        }
        if name in RESHARD and RESHARD[name][0] == mesh_text:
            reshard(name, t, weights, directory, out["reshard"])


def reshard(name: str, source, weights: dict, directory: Path, out: dict) -> None:
    """Save ``source`` (sharded) with Orbax and restore it on other meshes and one device; the
    same through the canonical single file (``weights`` + ``optimizer_state`` in an .npz)."""
    saved = directory / f"{name}-orbax"
    saved.mkdir()
    source.save(saved)
    want_w, want_o = source.weights(), source.optimizer_state()
    flat = directory / f"{name}-canonical.npz"
    np.savez(
        flat, **{f"w/{k}": v for k, v in want_w.items()}, **{f"o/{k}": v for k, v in want_o.items()}
    )
    _, orbax_targets, canonical_target = RESHARD[name]
    for how, target in [*(("orbax", m) for m in orbax_targets), ("canonical", canonical_target)]:
        t = trainer(name, target, weights)
        if how == "orbax":
            t.restore(saved)
        else:
            with np.load(flat) as f:
                t.load_state(
                    {k[2:]: f[k] for k in f.files if k.startswith("w/")},
                    {k[2:]: f[k] for k in f.files if k.startswith("o/")},
                )
        params = [leaf.variable.get_value() for leaf in fj._leaves(t.model)]
        out[f"{how} -> {target or 'one device'}"] = {
            "weights_identical": identical(t.weights(), want_w),
            "optimizer_identical": identical(t.optimizer_state(), want_o),
            "steps": t.steps,
            "devices": sorted({len(p.sharding.device_set) for p in params}),
            "shards": None if target is None else shard_report(t),
        }


def error(attempt) -> list[str] | None:
    """[type name, message] of the error ``attempt()`` raises (None: none)."""
    try:
        attempt()
    except (ParallelError, ValueError) as e:
        return [type(e).__name__, str(e)]
    return None


def errors(report: dict) -> None:
    """The messages of bad meshes (each must be one clear error)."""
    wl, cfg = config("gpt3")
    attempts = {
        "too_many_devices": lambda: trainer("gpt3", "data=16", initial_weights("gpt3")),
        "device_mesh": lambda: pj.device_mesh(MeshShape(data=2, fsdp=8)),
        "heads": lambda: plan(wl, cfg, MeshShape(tensor=4)),  # gpt3 tiny: 2 heads
        "mesh_mismatch": lambda: pj.shardings(
            plan(wl, cfg, MeshShape(data=2)), pj.device_mesh(MeshShape(fsdp=2))
        ),
    }
    report["errors"] = {key: error(attempt) for key, attempt in attempts.items()}


def main() -> None:
    directory = Path(sys.argv[1])
    cases = json.loads(sys.argv[2])
    WORKLOADS.update(cases["workloads"])
    RESHARD.update(cases["reshard"])
    report: dict = {"devices": len(jax.devices()), "workloads": {}}
    for name in WORKLOADS:
        start, cpu = time.perf_counter(), time.process_time()
        run(name, report["workloads"], directory)
        report["workloads"][name]["seconds"] = time.perf_counter() - start
        report["workloads"][name]["cpu_seconds"] = time.process_time() - cpu
    errors(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

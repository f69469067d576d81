"""The checks of ``test_parallel_tf.py``, run in one process that splits the CPU into four
logical devices before TensorFlow starts (which a test process that has already imported
TensorFlow can no longer do). Prints one JSON report on its last line.

Usage: ``python tests/parallel_tf_worker.py OUT_DIR WORKLOAD [WORKLOAD ...]``; OUT_DIR receives
the checkpoints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LOGICAL_DEVICES = 4
STEPS = 10
BATCH = 4  # global batch: 2 examples a replica on 2, 1 on 4
SEED = 0


def _split_cpu() -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(LOGICAL_DEVICES)]
    )


def _max_abs(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _max_rel(a: dict, b: dict) -> float:
    """max over parameters of max|a - b| / max|a| (the scale of the parameter)."""
    import numpy as np

    worst = 0.0
    for k in a:
        scale = max(float(np.max(np.abs(a[k]))), 1e-12)
        worst = max(worst, _max_abs(a[k], b[k]) / scale)
    return worst


def _identical(a: dict, b: dict) -> bool:
    import numpy as np

    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# Replica counts trained against the single device, per workload. gpt3 tiny's steps are the
# slow ones (2048-token sequences; 512 here, what data parallelism splits is the batch), so it
# trains on 2 only (it restores on 4).
REPLICAS = {"bert": (2, 4), "gpt3": (2,), "llama2_70b_lora": (2, 4)}
# Llama at lr 1e-3, not its tiny preset's 0.01, as in tests/test_parallel_jax.py: at 0.01 Adam
# turns the last-bit difference of a near-zero gradient, summed over the replicas in another
# order, into 1.02e-4 after the steps (seen on a CPU without AVX2), which measures Adam's
# sensitivity to rounding, not the replication.
OVERRIDES = {"gpt3": {"seq_len": 512}, "llama2_70b_lora": {"lr": 1e-3}}


def keras_distribution_on_tf() -> dict:
    """What ``keras.distribution.ModelParallel`` does to a variable on the TensorFlow backend."""
    import keras
    from keras import distribution as kd

    devices = kd.list_devices("cpu")[:2]
    mesh = kd.DeviceMesh((1, 2), ("batch", "model"), devices)
    layouts = kd.LayoutMap(mesh)
    layouts["dense.*kernel"] = (None, "model")
    distribution = kd.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    with distribution.scope():
        layer = keras.layers.Dense(8, name="dense")
        layer.build((None, 4))
    value = layer.kernel.value
    try:
        kd.distribute_tensor(value, kd.TensorLayout((None, "model"), mesh))
        distribute_tensor = None
    except AttributeError as e:
        distribute_tensor = str(e)
    return {
        "asked_layout": list(distribution.get_variable_layout(layer.kernel).axes),
        "variable_type": type(value).__name__,
        "variable_shape": list(value.shape),
        "variable_device": value.device,
        "distribute_tensor_error": distribute_tensor,
    }


def check(out_dir: Path, name: str) -> dict:
    """Single-device vs replicated training, checkpoints across replica counts, and errors."""
    import numpy as np

    from mlperf_tutor import workloads
    from mlperf_tutor.frameworks import tf as adapter
    from mlperf_tutor.parallel import MeshShape, ParallelError, plan
    from mlperf_tutor.parallel import tf as ptf

    wl = workloads.get(name)
    cfg = wl.deterministic(wl.config("tiny", **OVERRIDES.get(name, {})))
    weights = wl.parity_weights(cfg, seed=SEED)
    spec, schedule = wl.optimizer(cfg)
    batches = [wl.synthetic_batch(cfg, batch_size=BATCH, seed=SEED + 1 + s) for s in range(STEPS)]

    def trainer(replicas: int):
        if replicas == 1:
            model = wl.build("tf", cfg, weights=weights)
            return adapter.Trainer(model, spec, schedule, device="cpu", seed=SEED)
        the_plan = plan(wl, cfg, MeshShape(data=replicas))
        with ptf.building(the_plan):
            model = wl.build("tf", cfg, weights=weights)
            return adapter.Trainer(
                model, spec, schedule, seed=SEED, plan=ptf.realise(wl, cfg, the_plan)
            )

    single = trainer(1)
    # The first batch's gradient norm: above clip_norm, the replicated step must clip the
    # global gradient, not each replica's.
    _, grads = adapter.loss_and_grads(single.model, batches[0])
    norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values())))
    single_losses = [single.loss_value(single.step(b)) for b in batches]
    single_weights, single_state = single.weights(), single.optimizer_state()
    entry: dict = {"single_losses": single_losses, "grad_norm": norm, "clip_norm": spec.clip_norm}
    trained = {}
    for replicas in REPLICAS[name]:
        t = trained[replicas] = trainer(replicas)
        losses = [t.loss_value(t.step(b)) for b in batches]
        mirrored = t.model.trainable_variables[0].value
        entry[f"data={replicas}"] = {
            "replicas": t.plan.replicas,
            "variable_type": type(mirrored).__name__,
            "copies": len(getattr(mirrored, "values", [mirrored])),
            # Every replica's copy of every variable (weights, slots, step) the same bits.
            "copies_identical": all(
                all(np.array_equal(c.numpy(), v.value.values[0].numpy()) for c in v.value.values)
                for v in [*t.model.variables, *t._optimizer.native.variables]
            ),
            "loss_max_abs": _max_abs(losses, single_losses),
            "param_max_rel": _max_rel(single_weights, t.weights()),
            "state_max_rel": _max_rel(
                {k: v for k, v in single_state.items() if k != "step"},
                {k: v for k, v in t.optimizer_state().items() if k != "step"},
            ),
            "steps": t.steps,
        }
    # The 2-replica trainer's checkpoint, restored on 1 replica (the single-device trainer,
    # its update already traced) and on 4.
    two = trained[2]
    directory = out_dir / f"{name}-data2"
    directory.mkdir(parents=True)
    two.save(directory)
    restored = {"data=1": single, "data=4": trained.get(4) or trainer(4)}
    entry["restore"] = {}
    for key, t in restored.items():
        t.restore(directory)
        entry["restore"][key] = {
            "weights_identical": _identical(two.weights(), t.weights()),
            "state_identical": _identical(two.optimizer_state(), t.optimizer_state()),
            "steps": t.steps,
        }
    # The step after the restore: the same loss and weights on 1 replica as on 2.
    extra = wl.synthetic_batch(cfg, batch_size=BATCH, seed=SEED + 1 + STEPS)
    after_two = two.loss_value(two.step(extra))
    after_one = single.loss_value(single.step(extra))
    entry["resume"] = {
        "loss_abs": abs(after_two - after_one),
        "param_max_rel": _max_rel(single.weights(), two.weights()),
    }
    # Meshes TensorFlow cannot realise, and a batch the replicas do not divide.
    errors = {}
    for mesh_text in ("fsdp=2", "data=2,tensor=2", f"data={LOGICAL_DEVICES + 1}"):
        try:
            ptf.realise(wl, cfg, plan(wl, cfg, MeshShape.parse(mesh_text)))
            errors[mesh_text] = None
        except ParallelError as e:
            errors[mesh_text] = str(e)
    try:
        two.step(wl.synthetic_batch(cfg, batch_size=BATCH - 1, seed=99))
        errors["odd batch"] = None
    except ParallelError as e:
        errors["odd batch"] = str(e)
    outside = wl.build("tf", cfg, weights=weights)  # not under building(plan)
    try:
        adapter.Trainer(outside, spec, schedule, plan=two.plan)
        errors["built outside"] = None
    except ParallelError as e:
        errors["built outside"] = str(e)
    entry["errors"] = errors
    return entry


def run(out_dir: Path, names: list[str]) -> dict:
    _split_cpu()
    from mlperf_tutor.frameworks import tf as adapter

    adapter.pin_precision()
    report: dict = {"devices": len(adapter.devices()), "keras": keras_distribution_on_tf()}
    for name in names:
        report[name] = check(out_dir, name)
    return report


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]), sys.argv[2:])))

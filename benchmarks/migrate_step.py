"""Speed of a migrated training step: ``torch_to_jax``'s JAX step against the hand-written Flax
NNX model's jitted step and against the PyTorch step, on CPU.

The same workload model, weights, batch and optimizer (AdamW, clip none) three ways:

* ``torch``: the package's PyTorch model, eager ``loss.backward(); optimizer.step()``;
* ``migrated``: that PyTorch model and ``torch.optim.AdamW`` through
  :func:`mlperf_tutor.migrate.torch_to_jax` (``torch.export`` graph, our interpreter, optax);
* ``flax``: the package's hand-written Flax NNX model, split once and stepped by one
  ``jax.jit`` over its arrays with optax.

    python benchmarks/migrate_step.py --workload gpt3 --seq-len 128 --batch-size 8

Each is timed after warm-up (compilation) over ``--steps`` steps; the ratios are per step time.

On this project's CPU machine the migrated step was no slower than the hand-written model's:
XLA compiles both, and the translated core-ATen graph is plain matmuls and elementwise ops.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from timing import timed

from mlperf_tutor import frameworks, workloads
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec

LR, WEIGHT_DECAY = 1e-3, 0.01


def torch_step(wl, cfg, tree, batch):
    import torch

    model = wl.build("torch", cfg, weights=tree).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}

    def step():
        optimizer.zero_grad()
        model(tensors)["loss"].backward()
        optimizer.step()

    return step, lambda: None


def migrated_step(wl, cfg, tree, batch):
    import torch

    from mlperf_tutor.migrate import torch_to_jax

    model = wl.build("torch", cfg, weights=tree).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    migrated = torch_to_jax(model, optimizer, lambda m, b: m(b)["loss"], batch)
    state = {"loss": None}

    def step():
        migrated.params, migrated.state, state["loss"] = migrated.step(
            migrated.params, migrated.state, batch
        )

    return step, lambda: state["loss"].block_until_ready()


def flax_step(wl, cfg, tree, batch):
    adapter = frameworks.get("jax")
    model = wl.build("jax", cfg, weights=tree)
    # The package's training step: split once, one jax.jit over the arrays (nnx.jit's graph
    # bookkeeping costs milliseconds per call, which dominates a tiny model).
    spec = OptimizerSpec("adamw", weight_decay=WEIGHT_DECAY, eps=1e-8)
    trainer = adapter.Trainer(model, spec, ScheduleSpec(LR), device=adapter.use_device("auto"))
    handle = []

    def step():
        handle[:] = [trainer.step(batch)]

    return step, lambda: trainer.loss_value(handle[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workload", default="gpt3", choices=["bert", "gpt3", "llama2_70b_lora"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    frameworks.get("torch").pin_precision()
    frameworks.get("jax").pin_precision()
    wl = workloads.get(args.workload)
    cfg = wl.deterministic(wl.config("tiny", seq_len=args.seq_len))
    tree = wl.init_canonical(cfg, seed=0)
    batch = wl.synthetic_batch(cfg, batch_size=args.batch_size, seed=0)
    print(
        f"{args.workload} tiny, seq_len {args.seq_len}, batch {args.batch_size}, "
        f"{wl.param_count(cfg):,} parameters, {os.cpu_count()} CPU cores, float32"
    )
    seconds = {}
    for name, make in (("torch", torch_step), ("migrated", migrated_step), ("flax", flax_step)):
        step, sync = make(wl, cfg, tree, batch)
        seconds[name] = timed(step, args.steps, args.warmup, sync)
        print(f"  {name:9s} {1e3 * seconds[name]:8.2f} ms/step", flush=True)
    print(f"  migrated / hand-written flax: {seconds['migrated'] / seconds['flax']:.2f}x the time")
    print(f"  migrated / torch:             {seconds['migrated'] / seconds['torch']:.2f}x the time")
    assert np.isfinite(list(seconds.values())).all()


if __name__ == "__main__":
    main()

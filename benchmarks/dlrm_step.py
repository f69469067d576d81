"""DLRM-DCNv2 on one GPU: training-step throughput and embedding-bag bandwidth.

1. The ``small`` preset's training step (every table capped at 1M rows; the reference's
   multi-hot sizes, MLPs and cross layers) in PyTorch and JAX, float32 as the reference
   trains, with the package's models and Adagrad unchanged (dense gradients and updates of
   every table): samples/s.
2. Embedding-bag forward throughput: bytes of rows gathered per second by torch
   ``nn.EmbeddingBag(mode="sum")`` and by JAX ``jnp.take`` + sum, on one 1M-row table of
   dimension 128 with bags of 100 (the largest multi-hot size), against the GPU's measured
   device-to-device copy bandwidth (bytes read + written per second).

    python benchmarks/dlrm_step.py [--batch-size 16384] [--steps 20]

The JAX step is the adapter's ``train_step``, which returns the loss to the host every step;
the torch step does not read it.
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import timed

from mlperf_tutor import frameworks, workloads


def torch_training(wl, cfg, tree, batch):
    import torch

    adapter = frameworks.get("torch")
    model = wl.build("torch", cfg, weights=tree).cuda().train()
    optimizer = adapter.make_optimizer(*wl.optimizer(cfg), model)
    batch = {k: torch.from_numpy(v).cuda() for k, v in batch.items()}

    def step():
        model(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    return step, torch.cuda.synchronize


def jax_training(wl, cfg, tree, batch):
    import jax.numpy as jnp

    adapter = frameworks.get("jax")
    model = wl.build("jax", cfg, weights=tree)
    optimizer = adapter.make_optimizer(*wl.optimizer(cfg), model)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def step():  # the adapter's jitted step; it returns the loss as a float (one sync)
        adapter.train_step(model, optimizer, batch)

    return step, lambda: None


def bandwidth(steps: int) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    rows, dim, batch, hot = 1_000_000, 128, 16384, 100
    gathered = batch * hot * dim * 4  # bytes of rows read per forward
    ids = np.random.default_rng(0).integers(0, rows, (batch, hot))
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB
    target = torch.empty_like(source)
    copy = timed(lambda: target.copy_(source), steps, 3, torch.cuda.synchronize)
    copy_rate = 2 * source.numel() / copy
    bag = torch.nn.EmbeddingBag(rows, dim, mode="sum").cuda()
    torch_ids = torch.from_numpy(ids).cuda()
    with torch.no_grad():
        seconds = timed(lambda: bag(torch_ids), steps, 3, torch.cuda.synchronize)
    table = jnp.asarray(np.random.default_rng(1).standard_normal((rows, dim), np.float32))
    jax_ids = jnp.asarray(ids)
    pool = jax.jit(lambda t, i: jnp.take(t, i, axis=0).sum(axis=1))
    out = {}
    jax_seconds = timed(
        lambda: out.update(y=pool(table, jax_ids)), steps, 3, lambda: out["y"].block_until_ready()
    )
    print(f"copy bandwidth {copy_rate / 1e12:.2f} TB/s (1 GiB device-to-device, read + write)")
    for name, s in (("torch EmbeddingBag", seconds), ("jax take + sum", jax_seconds)):
        rate = gathered / s
        print(
            f"  {name:20s} {1e3 * s:6.2f} ms  {rate / 1e12:5.2f} TB/s gathered "
            f"= {100 * rate / copy_rate:4.1f}% of copy"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batch-size", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    wl = workloads.get("dlrm_dcnv2")
    cfg = wl.config("small")
    tree = wl.init_canonical(cfg)
    batch = wl.synthetic_batch(cfg, batch_size=args.batch_size, seed=0)
    print(f"dlrm_dcnv2 small: {wl.param_count(cfg) / 1e9:.2f}B parameters, batch {args.batch_size}")
    for name, make in (("torch", torch_training), ("jax", jax_training)):
        step, sync = make(wl, cfg, tree, batch)
        seconds = timed(step, args.steps, 3, sync)
        rate = args.batch_size / seconds
        print(f"  {name:5s} {1e3 * seconds:7.1f} ms/step  {rate:10.0f} samples/s", flush=True)
        del step, sync
    bandwidth(args.steps)


if __name__ == "__main__":
    main()

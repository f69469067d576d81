"""Throughput of BERT's training step: sequences/s and model FLOPs utilisation (MFU).

GPU mode (PyTorch and JAX): the ``small`` preset (BERT-base sized, 128 tokens) in mixed
precision, bf16 matmuls with float32 master weights and LAMB state, fused attention
(``F.scaled_dot_product_attention`` / ``jax.nn.dot_product_attention``), dropout off (the JAX
fused path has no attention dropout, so both run the same work).

CPU mode: the ``tiny`` preset's float32 step in every installed framework, through the package's
own training loop, as ratios to the fastest.

    python benchmarks/bert_step.py --device gpu [--batch-size 64] [--steps 30]
    python benchmarks/bert_step.py --device cpu

MFU = training FLOPs per sequence (``mlperf-tutor info bert``: 3 x the forward's matmul FLOPs)
x sequences/s / peak. The peak is the dense bf16 rate of the GPU (989 TFLOP/s for H100 SXM and
H200, from NVIDIA's datasheets; 1,979 TFLOP/s there is with 2:4 sparsity).
"""

from __future__ import annotations

import argparse

from timing import timed

from mlperf_tutor import frameworks, workloads

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def torch_gpu(wl, cfg, batch, steps: int, warmup: int) -> float:
    import torch

    from mlperf_tutor.workloads.bert import torch_model

    adapter = frameworks.get("torch")
    model = torch_model.build(cfg, fused=True)
    adapter.load_canonical(model, wl.init_canonical(cfg))
    model = model.cuda().train()
    spec, schedule = wl.optimizer(cfg)
    optimizer = adapter.make_optimizer(spec, schedule, model)
    batch = {k: torch.from_numpy(v).cuda() for k, v in batch.items()}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return timed(step, steps, warmup, torch.cuda.synchronize)


def jax_gpu(wl, cfg, batch, steps: int, warmup: int) -> float:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mlperf_tutor.frameworks import jax_optim
    from mlperf_tutor.workloads.bert import jax_model

    adapter = frameworks.get("jax")
    model = jax_model.build(cfg, fused=True)
    adapter.load_canonical(model, wl.init_canonical(cfg))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # The adapter's optax transformation works on a flat dict keyed by parameter name (names
    # decide weight decay and LAMB's trust ratio; Flax paths match the same patterns).
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in paths]
    flat = dict(zip(names, (leaf for _, leaf in paths), strict=True))
    spec, schedule = wl.optimizer(cfg)
    tx = jax_optim.make_transformation(spec, schedule, names)
    opt_state = tx.init(flat)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_fn(flat, rest, batch):
        # Mixed precision: bf16 copies of the float32 master weights for the forward.
        low = [flat[n].astype(jnp.bfloat16) for n in names]
        params = jax.tree_util.tree_unflatten(treedef, low)
        return nnx.merge(graphdef, params, rest)(batch)["loss"].astype(jnp.float32)

    @jax.jit
    def step(flat, opt_state, rest, batch):
        loss, grads = jax.value_and_grad(loss_fn)(flat, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, flat)
        return optax.apply_updates(flat, updates), opt_state, loss

    state = {"flat": flat, "opt": opt_state}

    def update():
        state["flat"], state["opt"], state["loss"] = step(state["flat"], state["opt"], rest, batch)

    return timed(update, steps, warmup, lambda: state["loss"].block_until_ready())


def gpu(args) -> None:
    wl = workloads.get("bert")
    cfg = wl.deterministic(wl.config("small"))
    batch = wl.synthetic_batch(cfg, batch_size=args.batch_size, seed=0)
    flops = wl.info(cfg)["training FLOPs per sequence (3x forward)"]
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"{name}; bert small (D {cfg.hidden}, L {cfg.num_layers}, S {cfg.seq_len}), "
          f"batch {args.batch_size}, bf16 mixed precision, fused attention")  # fmt: skip
    for framework, fn in (("torch", torch_gpu), ("jax", jax_gpu)):
        seconds = fn(wl, cfg, batch, args.steps, args.warmup)
        rate = args.batch_size / seconds
        mfu = f"{100 * flops * rate / peak:.1f}%" if peak else "n/a (unknown peak)"
        print(f"  {framework:5s} {1e3 * seconds:7.2f} ms/step  {rate:8.1f} seq/s  MFU {mfu}")


def cpu(args) -> None:
    from mlperf_tutor import train

    rates = {}
    for framework in frameworks.NAMES:
        if frameworks.available(framework):
            result = train.train("bert", framework, "tiny", max_steps=args.steps, progress=False)
            rates[framework] = result.samples_per_second
    best = max(rates.values())
    print(f"bert tiny, float32 on CPU, batch 8, {args.steps} steps (first excluded)")
    for framework, rate in rates.items():
        print(f"  {framework:5s} {rate:8.1f} seq/s  {rate / best:5.2f} x the fastest")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("gpu", "cpu"), required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if args.device == "gpu":
        gpu(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()

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
import importlib

import mixed_steps
from timing import timed

from mlperf_tutor import frameworks, workloads

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def gpu(args) -> None:
    wl = workloads.get("bert")
    cfg = wl.deterministic(wl.config("small"))
    batch = wl.synthetic_batch(cfg, batch_size=args.batch_size, seed=0)
    flops = wl.info(cfg)["training FLOPs per sequence (3x forward)"]
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(
        f"{name}; bert small (D {cfg.hidden}, L {cfg.num_layers}, S {cfg.seq_len}), "
        f"batch {args.batch_size}, bf16 mixed precision, fused attention"
    )
    tree, (spec, schedule) = wl.init_canonical(cfg), wl.optimizer(cfg)
    for framework in ("torch", "jax"):
        module = importlib.import_module(f"{wl.package}.{framework}_model")
        model = module.build(cfg, fused=True)
        frameworks.get(framework).load_canonical(model, tree)
        if framework == "jax":
            step, sync = mixed_steps.jax_step(model, spec, schedule, batch)
        else:
            step, sync = mixed_steps.torch_step(model, spec, schedule, batch, compile_model=False)
        seconds = timed(step, args.steps, args.warmup, sync)
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

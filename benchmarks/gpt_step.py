"""Throughput of the GPT-3 training step on one GPU: tokens/s and model FLOPs utilisation.

The ``small`` (GPT-3 Small, 125M, 1024 tokens) and ``1.3b`` (24 layers, d 2048, 2048 tokens)
presets, bf16 compute with float32 master weights and Adam state (PyTorch autocast; JAX bf16
copies of the float32 weights inside the jitted step), fused causal attention
(``F.scaled_dot_product_attention``; ``jax.nn.dot_product_attention`` with cuDNN), the
package's optimizer (AdamW, clipping at 1.0, warmup + cosine) and the package's models
unchanged. Three variants: PyTorch eager, PyTorch ``torch.compile``, JAX ``jit``.

    python benchmarks/gpt_step.py --preset small --batch-size 32
    python benchmarks/gpt_step.py --preset 1.3b --batch-size 8 [--variants torch-compile jax]

MFU follows PaLM (Chowdhery et al. 2022, appendix B): ``6 N + 12 L D T`` FLOPs per token
(``mlperf-tutor info gpt3``; N includes the LM head) x tokens/s / 989 TFLOP/s, the dense bf16
peak of the H100 SXM and H200 in NVIDIA's datasheets.

To time JAX with cuBLAS for every matmul instead of XLA's Triton GEMMs, run it with
``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false``.
"""

from __future__ import annotations

import argparse

import mixed_steps

from mlperf_tutor import workloads
from mlperf_tutor.workloads.gpt import flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=("small", "1.3b"), default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--variants", nargs="+", choices=mixed_steps.VARIANTS, default=list(mixed_steps.VARIANTS)
    )
    args = parser.parse_args()

    wl = workloads.get("gpt3")
    cfg = wl.config(args.preset)
    batch = wl.synthetic_batch(cfg, batch_size=args.batch_size, seed=0)
    tree = wl.init_canonical(cfg)  # once: 1.3b draws 1.3e9 normals
    flops = flops_per_token(cfg)
    print(
        f"gpt3 {args.preset}: {wl.param_count(cfg) / 1e6:.0f}M parameters, L {cfg.num_layers}, "
        f"D {cfg.hidden}, T {cfg.seq_len}, batch {args.batch_size}; {flops / 1e9:.2f} GFLOP "
        f"per token (6N + 12LDT)"
    )
    mixed_steps.measure(wl, cfg, tree, batch, args.variants, args.steps, args.warmup, flops)


if __name__ == "__main__":
    main()

"""Throughput of the Llama 2 LoRA training step on one GPU: tokens/s and model FLOPs utilisation.

The ``small`` preset (22 layers, d 2048, 32 heads sharing 4 kv heads, SwiGLU 5632, 4096 tokens;
1.1B base parameters) with the reference's adapters (rank 16, alpha 32 on ``qkv_proj`` and
``o_proj``), as LoRA is trained: frozen bf16 base weights, float32 adapters with AdamW state
(clip 0.3, cosine), bf16 compute, fused causal attention (``F.scaled_dot_product_attention``;
``jax.nn.dot_product_attention`` with cuDNN). The package's models unchanged; LoRA dropout off
(``Workload.deterministic``), so that JAX needs no RNG state in its step. Variants: PyTorch
eager, PyTorch ``torch.compile``, JAX ``jit``.

    python benchmarks/llama_step.py --batch-size 4 [--variants torch-compile jax]

MFU counts the FLOPs LoRA training needs (``mlperf-tutor info llama2_70b_lora``): ``4 N + 6
N_lora + 12 L D T`` per token (forward and activation gradients through every frozen matrix, no
weight gradients for them) x tokens/s / 989 TFLOP/s, the dense bf16 peak of the H100 SXM and
H200 in NVIDIA's datasheets.
"""

from __future__ import annotations

import argparse

import mixed_steps

from mlperf_tutor import workloads
from mlperf_tutor.layers.spec import is_adapter
from mlperf_tutor.workloads.llama import adapter_count, flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=("small", "tiny"), default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--variants", nargs="+", choices=mixed_steps.VARIANTS, default=list(mixed_steps.VARIANTS)
    )
    args = parser.parse_args()

    wl = workloads.get("llama2_70b_lora")
    cfg = wl.deterministic(wl.config(args.preset))
    batch = wl.synthetic_batch(cfg, batch_size=args.batch_size, seed=0)
    tree = wl.init_canonical(cfg)
    assert sum(map(is_adapter, tree)) == 4 * cfg.num_layers
    flops = flops_per_token(cfg)
    print(
        f"llama2_70b_lora {args.preset}: {wl.param_count(cfg) / 1e6:.0f}M base parameters, "
        f"{adapter_count(cfg) / 1e6:.2f}M adapter parameters, L {cfg.num_layers}, D "
        f"{cfg.hidden}, T {cfg.seq_len}, batch {args.batch_size}; {flops / 1e9:.2f} GFLOP per "
        f"token (4N + 6N_lora + 12LDT)"
    )
    mixed_steps.measure(wl, cfg, tree, batch, args.variants, args.steps, args.warmup, flops)


if __name__ == "__main__":
    main()

"""Throughput of the Stable Diffusion v2 UNet training step on one GPU: images/s and MFU.

The ``small`` preset (the SD v2 UNet layout at 192 channels, 318M parameters, 32x32 latents,
1024-wide text context of 77 tokens) or ``mlperf`` (865M, 64x64 latents), trained as the
reference trains it: float32 AdamW masters, bf16 compute (PyTorch autocast; bf16 copies in one
jitted JAX update), fused attention (``F.scaled_dot_product_attention``;
``jax.nn.dot_product_attention`` as XLA lowers it). Variants: PyTorch eager, ``torch.compile``, JAX
``jit``. The batch is the workload's synthetic one (latents, noise, timesteps, context).

    python benchmarks/sd_step.py --preset small --batch-size 32 [--variants torch-compile jax]

MFU: ``flops_per_image`` (``mlperf-tutor info stable_diffusion``: 3 x the forward's convolution,
linear and attention FLOPs) x images/s / 989 TFLOP/s, the dense bf16 peak of the H100 SXM and
H200 in NVIDIA's datasheets.
"""

from __future__ import annotations

import argparse

import mixed_steps

from mlperf_tutor import workloads
from mlperf_tutor.workloads.stable_diffusion import flops_per_image


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=("small", "mlperf", "tiny"), default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--variants", nargs="+", choices=mixed_steps.VARIANTS, default=list(mixed_steps.VARIANTS)
    )
    args = parser.parse_args()

    wl = workloads.get("stable_diffusion")
    cfg = wl.config(args.preset)
    batch = wl.synthetic_batch(cfg, batch_size=args.batch_size, seed=0)
    tree = wl.init_canonical(cfg)
    flops = flops_per_image(cfg)
    print(
        f"stable_diffusion {args.preset}: {wl.param_count(cfg) / 1e6:.0f}M parameters, "
        f"latents {cfg.latent_channels}x{cfg.latent_size}x{cfg.latent_size}, batch "
        f"{args.batch_size}; {flops / 1e9:.1f} GFLOP per training image"
    )
    # cuDNN's flash attention refuses the 77 context tokens of cross-attention (JAX 0.11:
    # "Unsupported sequence length"), so JAX attention is XLA's.
    mixed_steps.measure(
        wl,
        cfg,
        tree,
        batch,
        args.variants,
        args.steps,
        args.warmup,
        flops,
        unit="images",
        jax_attention=None,
    )


if __name__ == "__main__":
    main()

"""Throughput of the GPT-3 training step on one GPU: tokens/s, MFU and peak memory.

The package's step (``Trainer.step``, what ``mlperf-tutor train`` runs; see ``train_step.py``)
at the ``small`` (GPT-3 Small, 125M, 1024 tokens) or ``1.3b`` (24 layers, d 2048, 2048 tokens)
preset: bf16 compute with float32 master weights and AdamW state, fused causal attention
(``F.scaled_dot_product_attention``; ``jax.nn.dot_product_attention``, cuDNN for bf16 on a GPU),
PyTorch through ``torch.compile``.

    python benchmarks/gpt_step.py --preset small --batch-size 32
    python benchmarks/gpt_step.py --preset 1.3b --batch-size 8 [--frameworks jax]

MFU follows PaLM (Chowdhery et al. 2022, appendix B): ``6 N + 12 L D T`` FLOPs per token
(``mlperf-tutor info gpt3``; N includes the LM head) x tokens/s / 989 TFLOP/s, the dense bf16
peak of the H100 SXM and H200 in NVIDIA's datasheets.
"""

from __future__ import annotations

import sys

import train_step

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "gpt3", *sys.argv[1:]]
    if "--batch-size" not in sys.argv:
        sys.argv += ["--batch-size", "32"]
    train_step.main()

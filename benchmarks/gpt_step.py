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

Measured on one H200 (700 W cap; torch 2.11 + CUDA 13, jax 0.11.2; 2026-11-28):

======  ===========  ==============  ================  ==========================
preset  batch        torch eager     torch.compile     jax jit (+ triton GEMM off)
======  ===========  ==============  ================  ==========================
small   32 x 1024    29.3%           42.6%             38.3% (39.5%)
1.3b    8 x 2048     48.1%           55.4%             53.1% (55.4%)
======  ===========  ==============  ================  ==========================

"triton GEMM off" is ``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false`` (cuBLAS for every
matmul).
"""

from __future__ import annotations

import argparse

from timing import timed

from mlperf_tutor import frameworks, workloads
from mlperf_tutor.workloads.gpt import flops_per_token

PEAK_BF16 = 989e12
VARIANTS = ("torch-eager", "torch-compile", "jax")


def torch_step(wl, cfg, tree, batch, compile_model: bool):
    import torch

    from mlperf_tutor.workloads.gpt import torch_model

    adapter = frameworks.get("torch")
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 leftovers (none on the hot path)
    model = torch_model.build(cfg, fused=True)
    adapter.load_canonical(model, tree)
    model = model.cuda().train()
    optimizer = adapter.make_optimizer(*wl.optimizer(cfg), model)
    forward = torch.compile(model) if compile_model else model
    batch = {k: torch.from_numpy(v).cuda() for k, v in batch.items()}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step, torch.cuda.synchronize


def jax_step(wl, cfg, tree, batch):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mlperf_tutor.frameworks import jax_optim
    from mlperf_tutor.workloads.gpt import jax_model

    adapter = frameworks.get("jax")
    model = jax_model.build(cfg, fused=True, fused_implementation="cudnn")
    adapter.load_canonical(model, tree)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in paths]
    flat = dict(zip(names, (leaf for _, leaf in paths), strict=True))
    spec, schedule = wl.optimizer(cfg)
    tx = jax_optim.make_transformation(spec, schedule, names)
    state = {"flat": flat, "opt": tx.init(flat)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_fn(flat, rest, batch):
        low = [flat[n].astype(jnp.bfloat16) for n in names]  # bf16 copies of the masters
        params = jax.tree_util.tree_unflatten(treedef, low)
        return nnx.merge(graphdef, params, rest)(batch)["loss"].astype(jnp.float32)

    @jax.jit
    def update(flat, opt_state, rest, batch):
        loss, grads = jax.value_and_grad(loss_fn)(flat, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, flat)
        return optax.apply_updates(flat, updates), opt_state, loss

    def step():
        state["flat"], state["opt"], state["loss"] = update(
            state["flat"], state["opt"], rest, batch
        )

    return step, lambda: state["loss"].block_until_ready()


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
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()

    wl = workloads.get("gpt3")
    cfg = wl.config(args.preset)
    batch = wl.synthetic_batch(cfg, batch_size=args.batch_size, seed=0)
    tree = wl.init_canonical(cfg)  # once: 1.3b draws 1.3e9 normals
    flops = flops_per_token(cfg)
    tokens = args.batch_size * cfg.seq_len
    print(f"gpt3 {args.preset}: {wl.param_count(cfg) / 1e6:.0f}M parameters, L {cfg.num_layers}, "
          f"D {cfg.hidden}, T {cfg.seq_len}, batch {args.batch_size}; {flops / 1e9:.2f} GFLOP "
          f"per token (6N + 12LDT)")  # fmt: skip
    for variant in args.variants:
        if variant == "jax":
            step, sync = jax_step(wl, cfg, tree, batch)
        else:
            step, sync = torch_step(wl, cfg, tree, batch, compile_model=variant == "torch-compile")
        seconds = timed(step, args.steps, args.warmup, sync)
        rate = tokens / seconds
        print(f"  {variant:14s} {1e3 * seconds:8.1f} ms/step  {rate:10.0f} tokens/s  "
              f"MFU {100 * flops * rate / PEAK_BF16:5.1f}%", flush=True)  # fmt: skip
        del step, sync


if __name__ == "__main__":
    main()

"""Mixed-precision training steps shared by the GPU benchmarks (imported from beside them).

Both keep float32 master weights and optimizer state for what trains and compute in bf16:
PyTorch through autocast, JAX through bf16 copies of the masters inside one jitted update.
Weights that do not train (LoRA's frozen base) are stored in bf16 once, as LoRA training
stores them. Each function returns ``(step, sync)`` for :func:`timing.timed`.
"""

from __future__ import annotations

from mlperf_tutor import frameworks


def torch_step(model, spec, schedule, batch: dict, compile_model: bool):
    """One autocast bf16 step of a torch workload model (moved to the GPU here)."""
    import torch

    adapter = frameworks.get("torch")
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 leftovers (none on the hot path)
    model = model.cuda().train()
    for p in model.parameters():  # frozen weights in bf16; trained ones stay float32 masters
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    optimizer = adapter.make_optimizer(spec, schedule, model)
    forward = torch.compile(model) if compile_model else model
    batch = {k: torch.from_numpy(v).cuda() for k, v in batch.items()}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step, torch.cuda.synchronize


def jax_step(model, spec, schedule, batch: dict, compute_dtype: str = "bfloat16"):
    """One jitted step of an NNX workload model: optax over its ``nnx.Param`` leaves, the
    forward in ``compute_dtype`` (bf16 copies of the float32 masters; "float32": none)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mlperf_tutor.frameworks import jax_optim

    low_dtype = jnp.dtype(compute_dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Everything that does not train (a frozen base, if any) is cast once.
    rest = jax.tree.map(lambda x: x.astype(low_dtype) if x.dtype == jnp.float32 else x, rest)
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in paths]
    flat = dict(zip(names, (leaf for _, leaf in paths), strict=True))
    tx = jax_optim.make_transformation(spec, schedule, names)
    state = {"flat": flat, "opt": tx.init(flat)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_fn(flat, rest, batch):
        low = [flat[n].astype(low_dtype) for n in names]  # bf16 copies of the masters
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


PEAK_BF16 = 989e12  # dense bf16 FLOP/s of the H100 SXM and H200 (NVIDIA's datasheets)
VARIANTS = ("torch-eager", "torch-compile", "jax")


def measure(
    wl,
    cfg,
    tree,
    batch,
    variants,
    steps: int,
    warmup: int,
    flops: float,
    unit: str = "tokens",
    jax_attention: str | None = "cudnn",
) -> None:
    """Time each variant's step on ``wl``'s fused-attention model and print units/s and MFU
    (``flops`` model FLOPs per unit: a token of ``input_ids``, or with ``unit="images"`` a
    sample of the batch). ``jax_attention`` is the ``jax.nn.dot_product_attention``
    implementation (None: XLA's choice)."""
    import importlib

    from timing import timed

    first = next(iter(batch.values()))
    units = batch["input_ids"].size if unit == "tokens" else len(first)
    spec, schedule = wl.optimizer(cfg)
    for variant in variants:
        framework = "jax" if variant == "jax" else "torch"
        module = importlib.import_module(f"{wl.package}.{framework}_model")
        if framework == "jax":
            model = module.build(cfg, fused=True, fused_implementation=jax_attention)
        else:
            model = module.build(cfg, fused=True)
        frameworks.get(framework).load_canonical(model, tree)
        if framework == "jax":
            step, sync = jax_step(model, spec, schedule, batch)
        else:
            step, sync = torch_step(model, spec, schedule, batch, variant == "torch-compile")
        seconds = timed(step, steps, warmup, sync)
        rate = units / seconds
        print(
            f"  {variant:14s} {1e3 * seconds:8.1f} ms/step  {rate:10.1f} {unit}/s  "
            f"MFU {100 * flops * rate / PEAK_BF16:5.1f}%",
            flush=True,
        )
        del step, sync, model

"""Throughput of the package's training step: ms/step, units/s, MFU and peak memory.

Times ``Trainer.step`` of each framework adapter, the step ``mlperf_tutor.train`` runs, on one
batch of the workload's synthetic data: the model built as the training path builds it on an
accelerator (fused attention; the Keras model under the ``mixed_bfloat16`` policy for bf16),
float32 master weights and optimizer state, bf16 compute with ``--precision bf16``, torch's
forward through ``torch.compile`` unless ``--eager``. Dropout stays as the preset has it.

    python benchmarks/train_step.py gpt3 --preset small --batch-size 32
    python benchmarks/train_step.py all --device gpu    # every workload's small preset
    python benchmarks/train_step.py bert --device cpu --preset tiny --frameworks torch jax tf

MFU: ``Workload.flops_per_sample`` x samples/s over the device's dense bf16 peak
(``mlperf_tutor.train.progress.PEAK_BF16``: 989 TFLOP/s for the H100 SXM and H200).
Peak memory: ``torch.cuda.max_memory_allocated``; JAX's ``peak_bytes_in_use`` of the device
(both since the start of the process, so each framework runs in its own process here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from mlperf_tutor import frameworks, workloads
from mlperf_tutor.train.progress import mfu

# The small preset's batch that one 80 GB GPU takes (what the chapters and issue 16 name).
SMALL_BATCH = {
    "bert": 64,
    "gpt3": 32,
    "gptj": 4,
    "llama2_70b_lora": 4,
    "stable_diffusion": 32,
    "dlrm_dcnv2": 16384,
}


def peak_memory_gb(framework: str) -> float | None:
    if framework == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    if framework == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return peak / 1e9 if peak else None
    return None


def measure(args) -> dict:
    """Time one framework's step; returns the figures as a dict (also printed)."""
    wl = workloads.get(args.workload)
    cfg = wl.config(args.preset)
    batch_size = args.batch_size or SMALL_BATCH.get(args.workload, 8)
    adapter = frameworks.get(args.framework)
    device = adapter.use_device(args.device)
    accelerated = not device.lower().startswith("cpu")
    batch = wl.synthetic_batch(cfg, batch_size=batch_size, seed=0)
    model = wl.build(
        args.framework,
        cfg,
        weights=wl.init_canonical(cfg),
        precision=args.precision,
        fused=accelerated,
    )
    spec, schedule = wl.optimizer(cfg)
    options = {"compile": not args.eager} if args.framework == "torch" else {}
    trainer = adapter.Trainer(
        model, spec, schedule, precision=args.precision, device=device, seed=0, **options
    )
    for _ in range(args.warmup):
        handle = trainer.step(batch)
    trainer.loss_value(handle)
    start = time.perf_counter()
    for _ in range(args.steps):
        handle = trainer.step(batch)
    loss = trainer.loss_value(handle)
    seconds = (time.perf_counter() - start) / args.steps
    samples = batch_size / seconds
    unit = wl.recipe(cfg).units_per_sample
    result = {
        "workload": args.workload,
        "preset": args.preset,
        "framework": args.framework
        + ("" if args.framework != "torch" or args.eager else "-compile"),
        "device": device,
        "precision": args.precision,
        "batch": batch_size,
        "ms_per_step": 1e3 * seconds,
        "units_per_s": samples * unit,
        "unit": "tokens" if unit > 1 else "samples",
        # torch names its devices "cuda:0": the card's name (for its peak) is in the summary.
        "mfu": mfu(wl.flops_per_sample(cfg), samples, f"{device} {adapter.device_summary()}"),
        "peak_gb": peak_memory_gb(args.framework) if accelerated else None,
        "loss": loss,
    }
    utilisation = "n/a" if result["mfu"] is None else f"{result['mfu']:.3f}"
    memory = "n/a" if result["peak_gb"] is None else f"{result['peak_gb']:.1f} GB"
    print(
        f"  {args.workload:16s} {args.preset:6s} {result['framework']:13s} batch {batch_size:6d} "
        f"{result['ms_per_step']:9.2f} ms/step {result['units_per_s']:12.1f} "
        f"{result['unit']}/s  MFU {utilisation}  peak {memory}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workload", help="a workload name, or 'all'")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="gpu", choices=("auto", "cpu", "gpu", "tpu"))
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--frameworks", nargs="+", default=["torch", "jax"])
    parser.add_argument("--eager", action="store_true", help="torch without torch.compile")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=None, help="append each result as a JSON line here")
    parser.add_argument("--framework", default=None, help=argparse.SUPPRESS)  # one child run
    args = parser.parse_args()

    if args.framework is not None:
        result = measure(args)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
        return
    names = workloads.names() if args.workload == "all" else [args.workload]
    for name in names:
        if name == "toy":
            continue
        for framework in args.frameworks:
            # One process per run: peak memory is per process, and a framework that runs out
            # of memory does not take the others down.
            argv = [a for a in sys.argv[1:] if a not in ("all",)]
            if args.workload == "all":
                argv = [name, *argv]
            cmd = [sys.executable, __file__, *argv, "--framework", framework]
            code = subprocess.call(cmd, env=os.environ)
            if code != 0:
                print(f"  {name} {framework}: failed with exit code {code}", flush=True)


if __name__ == "__main__":
    main()

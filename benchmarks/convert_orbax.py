"""Benchmark: stream a large safetensors checkpoint to Orbax and back.

Writes a synthetic checkpoint (default 16 tensors of 128 MB, 2 GB), converts it to an Orbax
directory and back to safetensors with :func:`mlperf_tutor.convert.convert`, each direction in a
fresh subprocess so that its peak RSS (``VmHWM``) is its own, and compares with a plain file copy
(``shutil.copyfile``) of the same file. Target: peak RSS <= largest tensor x 1.5 + 500 MB, and
throughput within 2x of the copy.

Every timed step starts from the same state: no dirty pages pending (``os.sync``) and, with
``--cache cold`` (the default), its input files dropped from the page cache
(``posix_fadvise(DONTNEED)``), so the copy and the conversions all read from disk. With
``--cache warm`` the inputs are read once before each step instead; on machines that page out
cold memory in the background (DAMON), warm numbers vary from run to run.

    python benchmarks/convert_orbax.py                     # 16 x 128 MB float32 in /tmp
    python benchmarks/convert_orbax.py --tensors 4 --tensor-mb 512 --dtype bfloat16
    python benchmarks/convert_orbax.py --llama mlperf --layers 2   # Llama 2 70B shapes, bf16

With ``--llama PRESET`` the checkpoint is a Llama base model of that ``LlamaConfig`` preset: the
canonical names and PyTorch shapes (``word_embeddings``, ``blocks.{i}.attention.qkv_proj``, ...,
``lm_head``), bfloat16 unless ``--dtype`` says otherwise, optionally cut to the first
``--layers`` blocks to fit the disk. Conversion streams one tensor at a time, so its memory is
O(largest tensor); the run ends with a projection of each direction's peak RSS to the full
preset: measured peak - largest measured tensor + largest tensor of the full model.

Every file goes in a temporary directory under ``--dir``, removed at the end.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from mlperf_tutor.convert import TensorSpec
from mlperf_tutor.convert.safetensors_io import write_safetensors
from mlperf_tutor.workloads.llama.config import LlamaConfig

MB = 2**20
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _peak_rss_mb() -> float:
    """Peak RSS of this process, MB.

    Linux's ``VmHWM`` counts this program only; ``ru_maxrss`` would also count the parent's
    peak before the fork (the kernel carries it across ``exec``), here the synthetic file's
    generation.
    """
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(src: str, dst: str) -> None:
    """Run one conversion in this process; print seconds and RSS as JSON (the parent parses it)."""
    # Import the frameworks first: the timing is the conversion, not Python start-up.
    import orbax.checkpoint.experimental.v1  # noqa: F401

    from mlperf_tutor import convert

    base = _peak_rss_mb()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    convert.convert(src, dst)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_mb": _peak_rss_mb(),
                "import_rss_mb": base,
                "user_s": after.ru_utime - before.ru_utime,
                "sys_s": after.ru_stime - before.ru_stime,
            }
        )
    )


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]


def _prepare(inputs: list[str], cache: str) -> None:
    """Flush dirty pages, then drop (cold) or load (warm) the step's input files."""
    os.sync()
    for path in (f for p in inputs for f in _files(p)):
        with open(path, "rb") as f:
            if cache == "cold":
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while f.read(64 * MB):
                    pass


def _convert(src: str, dst: str, cache: str) -> dict:
    _prepare([src], cache)
    out = subprocess.run(
        [sys.executable, __file__, "--child", src, dst],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _copy(src: str, dst: str, cache: str) -> tuple[float, float]:
    """Seconds of ``shutil.copyfile``, and of the copy plus an fsync of the result."""
    _prepare([src], cache)
    start = time.perf_counter()
    shutil.copyfile(src, dst)
    copied = time.perf_counter() - start
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    synced = time.perf_counter() - start
    os.remove(dst)
    return copied, synced


def _llama_specs(cfg: LlamaConfig, dtype: np.dtype, layers: int | None = None) -> dict:
    """Canonical names and PyTorch shapes (a Linear weight is (out, in)) of a Llama base
    checkpoint (no LoRA tensors), with the first ``layers`` blocks (all when ``None``)."""
    V, D, F = cfg.vocab_size, cfg.hidden, cfg.ffn
    shapes = {"word_embeddings.weight": (V, D)}
    for i in range(cfg.num_layers if layers is None else layers):
        shapes |= {
            f"blocks.{i}.attention_norm.weight": (D,),
            f"blocks.{i}.attention.qkv_proj.weight": (cfg.qkv_dim, D),  # (N + 2K) H rows
            f"blocks.{i}.attention.o_proj.weight": (D, D),
            f"blocks.{i}.mlp_norm.weight": (D,),
            f"blocks.{i}.mlp.fc_gate.weight": (F, D),
            f"blocks.{i}.mlp.fc_in.weight": (F, D),
            f"blocks.{i}.mlp.fc_out.weight": (D, F),
        }
    shapes |= {"final_norm.weight": (D,), "lm_head.weight": (V, D)}
    return {name: TensorSpec(shape, np.dtype(dtype)) for name, shape in shapes.items()}


def _synthetic(path: str, specs: dict) -> None:
    rng = np.random.default_rng(0)

    def tensors():
        for name, spec in specs.items():
            normal = rng.standard_normal(spec.shape, dtype=np.float32)
            yield name, normal.astype(spec.dtype, copy=False)

    write_safetensors(path, specs, tensors())


def _project(preset: str, dtype: np.dtype, largest_mb: float, runs: dict) -> None:
    """Print each direction's peak RSS projected to the full preset: conversion holds one tensor
    at a time, so peak - largest measured tensor + largest full-model tensor."""
    cfg = LlamaConfig.preset(preset)
    full = _llama_specs(cfg, dtype)
    name = max(full, key=lambda n: full[n].nbytes)
    full_largest_mb = full[name].nbytes / MB
    total_gb = sum(s.nbytes for s in full.values()) / 1e9
    print(
        f"PROJECTION (not measured) to the full {preset} model: {cfg.num_layers} layers, "
        f"{len(full)} tensors, {total_gb:.1f} GB {dtype.name}; largest tensor {name} "
        f"{full[name].shape} {full_largest_mb:.0f} MB"
    )
    for key, label in (("to", "safetensors -> orbax"), ("from", "orbax -> safetensors")):
        peak = max(r["peak_rss_mb"] for r in runs[key])
        print(
            f"  {label}: projected peak RSS {peak - largest_mb + full_largest_mb:.0f} MB = "
            f"measured {peak:.0f} - largest measured tensor {largest_mb:.0f} + largest "
            f"full-model tensor {full_largest_mb:.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tensors", type=int, help="number of equal tensors (default 16)")
    parser.add_argument("--tensor-mb", type=float, help="size of each tensor, MB (default 128)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="default float32, bfloat16 with --llama"
    )
    parser.add_argument(
        "--llama",
        choices=sorted(LlamaConfig.PRESETS),
        metavar="PRESET",
        help=f"a Llama base checkpoint of this preset ({', '.join(LlamaConfig.PRESETS)}) "
        "instead of equal tensors",
    )
    parser.add_argument("--layers", type=int, help="with --llama: only the first N blocks")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every step")
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold")
    parser.add_argument("--dir", default="/tmp", help="where the temporary files go")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0

    if args.llama:
        if args.tensors is not None or args.tensor_mb is not None:
            parser.error("--tensors and --tensor-mb size equal tensors; --llama takes the preset's")
        cfg = LlamaConfig.preset(args.llama)
        if args.layers is not None and not 1 <= args.layers <= cfg.num_layers:
            parser.error(f"--layers must be in 1..{cfg.num_layers} for preset {args.llama}")
        dtype = np.dtype(DTYPES[args.dtype or "bfloat16"])
        specs = _llama_specs(cfg, dtype, args.layers)
        layers = cfg.num_layers if args.layers is None else args.layers
        what = f"Llama {args.llama} base, {layers} of {cfg.num_layers} layers"
    else:
        if args.layers is not None:
            parser.error("--layers needs --llama")
        dtype = np.dtype(DTYPES[args.dtype or "float32"])
        count, tensor_mb = args.tensors or 16, args.tensor_mb or 128
        numel = int(tensor_mb * MB) // dtype.itemsize
        specs = {f"layers.{i}.weight": TensorSpec((numel,), dtype) for i in range(count)}
        what = f"{count} equal tensors"
    largest_name = max(specs, key=lambda name: specs[name].nbytes)
    largest_mb = specs[largest_name].nbytes / MB
    total_mb = sum(s.nbytes for s in specs.values()) / MB
    work = tempfile.mkdtemp(prefix="convert_orbax_", dir=args.dir)
    try:
        src = os.path.join(work, "model.safetensors")
        ckpt = os.path.join(work, "model_orbax")
        back = os.path.join(work, "back.safetensors")
        print(f"writing {what}, {total_mb:.0f} MB {dtype.name}, to {src} ...")
        _synthetic(src, specs)

        runs: dict[str, list] = {"copy": [], "copy+fsync": [], "to": [], "from": []}
        identical = True
        for _ in range(args.repeat):
            copied, synced = _copy(src, os.path.join(work, "copy"), args.cache)
            runs["copy"].append(copied)
            runs["copy+fsync"].append(synced)
            runs["to"].append(_convert(src, ckpt, args.cache))
            runs["from"].append(_convert(ckpt, back, args.cache))
            identical &= filecmp.cmp(src, back, shallow=False)
            shutil.rmtree(ckpt)
            os.remove(back)

        def mbs(seconds: float) -> str:
            return f"{total_mb / seconds:6.0f}"

        print(
            f"\n{total_mb:.0f} MB in {len(specs)} tensors ({what}), largest {largest_name} "
            f"{specs[largest_name].shape} {largest_mb:.0f} MB; {args.cache} page cache; "
            f"MB/s of each of {args.repeat} runs"
        )
        print(f"  {'plain copy (shutil.copyfile)':28s} " + " ".join(map(mbs, runs["copy"])))
        print(f"  {'plain copy + fsync':28s} " + " ".join(map(mbs, runs["copy+fsync"])))
        for key, label in (("to", "safetensors -> orbax"), ("from", "orbax -> safetensors")):
            seconds = " ".join(mbs(r["seconds"]) for r in runs[key])
            peaks = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in runs[key])
            base = max(r["import_rss_mb"] for r in runs[key])
            cpu = ", ".join(f"{r['user_s']:.1f}+{r['sys_s']:.1f}" for r in runs[key])
            print(
                f"  {label:28s} {seconds}   peak RSS MB {peaks} (after imports {base:.0f}); "
                f"CPU s user+sys {cpu}"
            )
        print(f"round trip bit-identical: {identical}")

        copy_mbs = total_mb / statistics.median(runs["copy"])
        rss_target = largest_mb * 1.5 + 500
        ok = identical
        for key, label in (("to", "safetensors -> orbax"), ("from", "orbax -> safetensors")):
            speed = total_mb / statistics.median(r["seconds"] for r in runs[key])
            peak = max(r["peak_rss_mb"] for r in runs[key])
            rss_ok, speed_ok = peak <= rss_target, speed >= copy_mbs / 2
            ok &= rss_ok and speed_ok
            print(
                f"{label}: peak RSS {peak:.0f} MB vs target {rss_target:.0f} MB "
                f"({'met' if rss_ok else 'MISSED'}); median {speed:.0f} MB/s vs half the copy's "
                f"median {copy_mbs / 2:.0f} MB/s ({'met' if speed_ok else 'MISSED'})"
            )
        if args.llama:
            _project(args.llama, dtype, largest_mb, runs)
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

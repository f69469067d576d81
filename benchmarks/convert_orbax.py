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

from mlperf_tutor.convert.formats import TensorSpec
from mlperf_tutor.convert.safetensors_io import write_safetensors

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
    print(json.dumps({
        "seconds": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "import_rss_mb": base,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
    }))  # fmt: skip


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
        check=True, capture_output=True, text=True,
    )  # fmt: skip
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


def _synthetic(path: str, count: int, numel: int, dtype: np.dtype) -> None:
    specs = {f"layers.{i}.weight": TensorSpec((numel,), np.dtype(dtype)) for i in range(count)}
    rng = np.random.default_rng(0)

    def tensors():
        for name in specs:
            yield name, rng.standard_normal(numel, dtype=np.float32).astype(dtype, copy=False)

    write_safetensors(path, specs, tensors())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tensors", type=int, default=16, help="number of tensors")
    parser.add_argument("--tensor-mb", type=float, default=128, help="size of each tensor, MB")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every step")
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold")
    parser.add_argument("--dir", default="/tmp", help="where the temporary files go")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0

    dtype = np.dtype(DTYPES[args.dtype])
    numel = int(args.tensor_mb * MB) // dtype.itemsize
    largest_mb = numel * dtype.itemsize / MB
    total_mb = largest_mb * args.tensors
    work = tempfile.mkdtemp(prefix="convert_orbax_", dir=args.dir)
    try:
        src = os.path.join(work, "model.safetensors")
        ckpt = os.path.join(work, "model_orbax")
        back = os.path.join(work, "back.safetensors")
        print(f"writing {args.tensors} x {largest_mb:.0f} MB {args.dtype} to {src} ...")
        _synthetic(src, args.tensors, numel, dtype)

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

        print(f"\n{total_mb:.0f} MB in {args.tensors} tensors, largest {largest_mb:.0f} MB; "
              f"{args.cache} page cache; MB/s of each of {args.repeat} runs")  # fmt: skip
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
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

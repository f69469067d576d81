"""The ``mlperf-tutor`` command line: list, info, parity, train, convert, score, doctor."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from mlperf_tutor import frameworks, workloads
from mlperf_tutor.core.config import (
    ANY,
    AT_LEAST_ONE,
    NON_NEGATIVE,
    Invalid,
    Range,
    check_float,
    check_int,
)
from mlperf_tutor.train import loop as train_options

CONVERT_HELP = """\
Formats are inferred from the paths:
  *.safetensors        canonical names, PyTorch layouts (streamed tensor by tensor)
  *.pt, *.pth, *.bin   a PyTorch state_dict (loaded with weights_only=True only)
  *.weights.h5         Keras weights of the workload's TensorFlow model (needs --preset)
  *.hf, or a directory holding config.json
                       a Hugging Face save_pretrained directory (config.json +
                       model.safetensors, transformers names; bert). As a source its
                       config.json gives the architecture (--preset the rest); as a
                       destination --preset gives config.json. Name a new one NAME.hf
  any other directory  an Orbax checkpoint of the canonical dict (JAX)
The source is checked against the workload's expected names, shapes and dtypes before
anything is written; on any mismatch nothing is written.

Examples: mlperf-tutor convert toy model.safetensors ckpt_dir/ --preset tiny
          mlperf-tutor convert bert bert-large-uncased/ model.safetensors
          mlperf-tutor convert bert model.safetensors bert-large.hf --preset mlperf
"""


AUTO = "auto"
PRESET_HELP = (
    "a preset of the workload (see list), or auto: tiny on a CPU, small where a framework sees "
    "a GPU or TPU (MLPERF_TUTOR_PRESET overrides it)"
)


def _int_option(limit: Range):
    """An argparse type: an integer (not ``2.0``, ``1e9`` or ``true``) in ``limit`` and int32."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            return check_int(value, limit)
        except Invalid as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _finite(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` are refused)."""
    try:
        return check_float(float(text), ANY)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    except Invalid as e:
        raise argparse.ArgumentTypeError(str(e)) from None


COUNT = _int_option(AT_LEAST_ONE)  # steps, batch sizes, samples, checkpoints kept
SEED = _int_option(NON_NEGATIVE)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def cmd_list(args) -> int:
    for name in workloads.names():
        wl = workloads.get(name)
        print(f"{name:20s} presets: {', '.join(wl.presets):24s} {wl.description}")
    print(f"frameworks installed: {', '.join(frameworks.installed()) or 'none'}")
    for name in frameworks.NAMES:
        if not frameworks.available(name):
            print(f"  {name} is not available: {frameworks.install_hint(name)}")
    return 0


def _preset(args) -> str:
    """``--preset auto``: the size that fits this machine (``tiny`` on a CPU, ``small`` where a
    framework sees a GPU or TPU), as the chapters choose it."""
    if args.preset != AUTO:
        return args.preset
    from mlperf_tutor.train import device_preset

    preset = device_preset(args.workload)
    print(f"--preset auto: {preset}", file=sys.stderr)
    return preset


def cmd_info(args) -> int:
    wl = workloads.get(args.workload)
    cfg = wl.config(_preset(args))
    rows = wl.info(cfg)
    if args.mesh is not None:
        rows.update(_mesh_info(wl, cfg, args))
    for key, value in rows.items():
        print(f"{key:40s} {_format_value(value)}")
    return 0


def _mesh_info(wl, cfg, args) -> dict:
    """Per-device memory and per-axis traffic of ``args.mesh`` (nothing allocated)."""
    from mlperf_tutor import parallel

    plan = parallel.plan(wl, cfg, parallel.MeshShape.parse(args.mesh))
    batch = args.batch_size or getattr(cfg, "global_batch_size", None)
    if batch is None:
        raise ValueError(f"workload {wl.name!r} has no global batch size; give --batch-size")
    held = wl.device_memory(cfg, plan, batch, args.precision)
    sent = wl.communication(cfg, plan, batch, args.precision)
    rows = {
        "mesh": f"{plan.mesh} ({plan.mesh.devices} devices)",
        "batch (global / per data x fsdp slice)": f"{batch} / {batch // plan.mesh.batch_shards}",
        "per device: weights (GB)": held.weights / 1e9,
        "per device: gradients (GB)": held.gradients / 1e9,
        "per device: optimizer state (GB)": held.optimizer_state / 1e9,
        "per device: activations (GB)": (
            "not estimated" if held.activations is None else held.activations / 1e9
        ),
        "per device: total (GB)": held.total / 1e9,
    }
    rows.update({f"sent per step per device, {what} (GB)": b / 1e9 for what, b in sent.items()})
    return rows


def cmd_parity(args) -> int:
    from mlperf_tutor import parity

    report = parity.run(
        args.workload,
        _preset(args),
        frameworks=args.frameworks,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=True,
        precision=args.precision,
    )
    print(report.table())
    for name, how in report.missing.items():
        print(f"{name} not compared, not available here: {how}")
    return 0 if report.ok else 1


def cmd_make_sample_data(args) -> int:
    wl = workloads.get(args.workload)
    cfg = wl.config(_preset(args))
    path = wl.write_sample_data(cfg, args.directory, samples=args.samples, seed=args.seed)
    print(f"{args.workload}: {args.samples} samples in {path} (pass it as --data)")
    return 0


def cmd_train(args) -> int:
    from mlperf_tutor import train

    args.preset = _preset(args)
    if args.framework is None:
        installed = frameworks.installed()
        if not installed:
            raise frameworks.FrameworkNotInstalled(
                "no framework is installed here; "
                + "; ".join(f"{f}: {frameworks.install_hint(f)}" for f in frameworks.NAMES)
            )
        args.framework = installed[0]
        print(f"--framework {args.framework} (the first installed)", file=sys.stderr)

    if args.mesh is not None and args.framework == "torch" and "RANK" not in os.environ:
        return _torchrun(args)
    if args.dry_run:
        train.dry_run(
            args.workload,
            args.framework,
            args.preset,
            batch_size=args.batch_size,
            seed=args.seed,
            deterministic=args.deterministic,
            mllog=args.mllog,
        )
        if args.mllog:
            print(f"MLPerf log (configuration only): {args.mllog}")
        return 0
    result = train.train(
        args.workload,
        args.framework,
        args.preset,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        deterministic=args.deterministic,
        target=args.target,
        curve=args.curve,
        mllog=args.mllog,
        device=args.device,
        precision=args.precision,
        data=args.data,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
        resume=args.resume,
        mesh=args.mesh,
    )
    if args.mesh is not None and args.framework == "torch" and os.environ.get("RANK") != "0":
        return 0  # rank 0 reports
    if not result.losses:
        print(
            f"{args.workload} {args.framework}: already at step {result.start_step}; nothing to do"
        )
        return 0
    rate = f"{result.samples_per_second:.1f} samples/s"
    if result.units_per_second != result.samples_per_second:
        rate += f" ({result.units_per_second:.1f} tokens/s)"
    if result.mfu is not None:
        rate += f", MFU {result.mfu:.3f}"
    print(
        f"{args.workload} {args.framework} on {result.device} ({result.precision}): "
        f"{len(result.losses)} steps from step {result.start_step}, loss "
        f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}, {rate} after the first step"
    )
    if result.evals:
        samples, _ = result.evals[-1]
        measured = ", ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics[-1].items())
        print(f"{measured} after {samples:,} samples (target {result.target:.4g}): {result.status}")
    if args.mllog:
        print(f"MLPerf log: {args.mllog}")
    if args.curve:
        print(f"loss curve: {args.curve}")
    if args.checkpoint_dir:
        print(f"checkpoints: {args.checkpoint_dir}")
    return 0


def _torchrun(args) -> int:
    """Run this ``train --mesh`` command again under torchrun, one process per mesh device
    (gloo on a CPU, NCCL on GPUs: see :func:`mlperf_tutor.train.train`); its exit status."""
    from mlperf_tutor.parallel import MeshShape

    mesh = MeshShape.parse(args.mesh)  # no -1 here: the process count must be known
    argv = list(sys.argv[1:] if args.argv is None else args.argv)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={mesh.devices}",
        "-m",
        "mlperf_tutor",
        *argv,
    ]
    print(f"--mesh {mesh}: {' '.join(command[1:6])} ...", file=sys.stderr)
    return subprocess.run(command, check=False).returncode


def cmd_convert(args) -> int:
    from mlperf_tutor import convert

    wl = workloads.get(args.workload)
    preset = _preset(args)
    cfg = wl.config(preset)
    if wl.hf is not None and convert.detect_format(args.src) == "hf":
        # The checkpoint's own config.json fixes the architecture; no preset has to match it.
        cfg = wl.config_from_hf(args.src, preset=preset)
    # With the workload and config, convert checks the source against the workload's canonical
    # names, shapes and dtypes before anything is written.
    convert.convert(args.src, args.dst, workload=wl, cfg=cfg, progress=True)
    print(f"wrote {args.dst}")
    return 0


def cmd_score(args) -> int:
    from mlperf_tutor.mlperf import score

    print(score(args.dir, ruleset=args.ruleset).table())
    return 0


def cmd_doctor(args) -> int:
    from mlperf_tutor.core import io

    found = io.leftovers_below(args.path)
    if not found:
        print(f"{args.path}: no leftovers of interrupted writes")
        return 0
    pending = 0
    for item in found:
        print(f"{item.path}: {item.describe()}")
        if item.state == io.IN_USE:
            continue
        if not args.fix:
            pending += 1
            what = {
                io.RECOVERABLE: "--fix moves the previous directory back, then removes it",
                io.STRANDED: "--fix keeps it (see below)",
            }.get(item.state, "--fix removes it")
            print(f"  {what}")
        else:
            try:
                action = io.fix(item)
            except OSError as e:
                action = f"kept: {e.strerror or e}"
            print(f"  {action}")
            pending += action.startswith("kept")
        if item.state == io.STRANDED:
            print(
                f"  inspect {item.path / item.destination.name}: move it to {item.destination} "
                f"if it is complete, or remove {item.path}"
            )
    return 1 if pending else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlperf-tutor",
        description="MLPerf Training workloads in PyTorch, JAX and TensorFlow.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "list", help="workloads, presets and the frameworks installed", allow_abbrev=False
    )
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "info", help="parameters, memory, FLOPs (nothing allocated)", allow_abbrev=False
    )
    p.add_argument("workload")
    p.add_argument("--preset", default="tiny", help=PRESET_HELP)
    p.add_argument(
        "--mesh",
        help="a device mesh such as data=2,fsdp=4,tensor=8: print what each device holds and "
        "what each step sends on each axis",
    )
    p.add_argument(
        "--batch-size", type=COUNT, help="global batch for --mesh (default: the preset's)"
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="for --mesh")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "parity", help="compare frameworks; exit 1 when a bar is missed", allow_abbrev=False
    )
    p.add_argument("workload")
    p.add_argument("--preset", default="tiny", help=PRESET_HELP)
    p.add_argument("--steps", type=COUNT, default=10)
    p.add_argument("--batch-size", type=COUNT, default=2)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument(
        "--frameworks",
        nargs="+",
        default=None,
        choices=frameworks.NAMES,
        help="default: every framework installed here",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=train_options.PRECISIONS,
        help="bf16: each framework's bf16 training losses against the first one's float32",
    )
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser(
        "train",
        help="train on a device, fp32 or bf16, from synthetic batches or real data files, "
        "with checkpoints and resume",
        allow_abbrev=False,
    )
    p.add_argument("workload")
    p.add_argument(
        "--framework", default=None, choices=frameworks.NAMES, help="default: the first installed"
    )
    p.add_argument("--preset", default="tiny", help=PRESET_HELP)
    p.add_argument(
        "--max-steps",
        type=COUNT,
        default=50,
        help="step limit; a run that has not reached --target by then stops as aborted",
    )
    p.add_argument(
        "--target",
        type=_finite,
        default=None,
        help="quality that ends the run (default: the workload's target; bert 0.720, gpt3 "
        "2.69; stable_diffusion: FID, with the preset's CLIP bar beside it)",
    )
    p.add_argument(
        "--batch-size",
        type=COUNT,
        default=None,
        help="examples per step (default: the preset's global batch size)",
    )
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--deterministic", action="store_true", help="dropout off")
    p.add_argument("--curve", default=None, help="write step,loss rows to this CSV file")
    p.add_argument(
        "--mllog",
        default=None,
        help="write an MLPerf Training v4.0 log to this file (MLPerf workloads, not toy)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="log the configuration and hyperparameters (to --mllog, or stdout) without training",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=train_options.DEVICES,
        help="auto: the accelerator if there is one (default)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=train_options.PRECISIONS,
        help="bf16: float32 master weights and optimizer state, bf16 compute",
    )
    p.add_argument(
        "--data",
        default=None,
        help="the workload's real-format data (see make-sample-data); default: synthetic",
    )
    p.add_argument("--checkpoint-dir", default=None, help="save checkpoints here")
    p.add_argument("--checkpoint-every", type=COUNT, default=None, help="save every N steps")
    p.add_argument("--keep", type=COUNT, default=2, help="checkpoints to keep (the newest)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --checkpoint-dir (any framework's)",
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="train on a device mesh, e.g. fsdp=2,tensor=2 (one axis may be -1: the rest); "
        "torch starts one process per device with torchrun; on --device cpu, JAX and "
        "TensorFlow simulate the devices",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "make-sample-data",
        help="write a small dataset in the workload's real MLPerf format (for --data)",
        allow_abbrev=False,
    )
    p.add_argument("workload")
    p.add_argument("directory", help="where to write it (created; must be empty or absent)")
    p.add_argument("--preset", default="tiny", help=PRESET_HELP)
    p.add_argument("--samples", type=COUNT, default=64)
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=cmd_make_sample_data)

    p = sub.add_parser(
        "convert",
        help="move a checkpoint between formats/frameworks",
        description=CONVERT_HELP,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("workload")
    p.add_argument("src", help="source checkpoint (format from the path)")
    p.add_argument("dst", help="destination (format from the path)")
    p.add_argument("--preset", default="tiny", help=PRESET_HELP)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "score",
        help="time-to-train of MLPerf result logs, as the official result_summarizer scores them",
        allow_abbrev=False,
    )
    p.add_argument(
        "dir", help="<dir>/<benchmark>/result_N.txt, or <submitter>/results/<system>/<benchmark>/"
    )
    p.add_argument(
        "--ruleset",
        default="4.0.0",
        help="MLPerf Training ruleset of the logs (default 4.0.0; also 4.1.0, 5.0.0 to 6.1.0)",
    )
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "doctor",
        help="find what interrupted writes left (temporaries, staged checkpoints) and sweep it",
        description="Lists the temporaries of interrupted checkpoint and data writes under PATH "
        "(a directory, searched below; or a destination file). Exit status 1 while something "
        "needs --fix or a look. With --fix: temporaries whose writer is gone are removed, a "
        "previous checkpoint found in a staging directory is moved back to its missing "
        "destination; a new checkpoint that never reached its place is reported and kept. "
        "Writes still in progress are left alone.",
        allow_abbrev=False,
    )
    p.add_argument("path", help="a directory (searched below) or a checkpoint or data file")
    p.add_argument("--fix", action="store_true", help="sweep what was found")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv  # what train --mesh passes on to torchrun
    from mlperf_tutor.core.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ValueError, CheckpointError, frameworks.FrameworkNotInstalled) as err:
        print(f"mlperf-tutor: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

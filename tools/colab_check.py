"""Run every ``.ipynb`` twin as a Colab user would (``make colab-check`` / ``colab-check-tpu``).

1. A fresh virtual environment of ``--python`` (3.12, as Colab) with the newest releases pip
   resolves, unpinned, of what a Colab runtime brings: on ``--runtime gpu`` torch from PyPI
   (the CUDA build, which brings triton), jax, flax, optax, TensorFlow and Keras; on
   ``--runtime tpu`` the same without TensorFlow and Keras (a Colab TPU runtime has none).
   Plus the notebook kernel, matplotlib, pandas and scikit-learn, which Colab preinstalls.
2. For each twin, a fresh "runtime": the package is uninstalled, the notebook runs top to bottom
   in a new kernel of that environment, in an empty working directory (Colab's ``/content``
   holds no checkout), with ``MLPERF_TUTOR_SOURCE`` pointing at this checkout so that the
   notebook's own install cell installs it, and ``MLPERF_TUTOR_RUNTIME`` saying which runtime
   this imitates (the install cell would otherwise see this machine's hardware).

The executed notebooks, one log per notebook and ``summary.txt`` (time per notebook) are
written to ``.colab/<runtime>/``. Exit status 1 if any notebook raised.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parents[1]

COLAB_LIKE = {
    "gpu": ["torch", "jax", "flax", "optax", "tensorflow", "keras"],
    "tpu": ["torch", "jax", "flax", "optax"],
}
# What Colab preinstalls around the frameworks (the kernel and the usual data tools).
PREINSTALLED = ["ipykernel", "matplotlib", "pandas", "scikit-learn"]
# The line a chapter prints for a cell whose framework is missing (frameworks.present).
SKIP_LINE = "is not installed here, so this cell is skipped"
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # in tracebacks' last lines


def run(command: list[str], **kwargs) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def make_environment(python: str, runtime: str, venv: Path) -> Path:
    """A fresh venv with the Colab-like packages; returns its python."""
    found = shutil.which(python) or (python if Path(python).is_file() else None)
    if found is None:
        sys.exit(f"error: --python {python!r} is not on PATH (make colab-check COLAB_PYTHON=...)")
    version = subprocess.run(
        [found, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != "3.12":
        print(f"note: --python is Python {version}; Colab runs 3.12", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    run([found, "-m", "venv", str(venv)])
    vpython = venv / "bin" / "python"
    run([str(vpython), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([str(vpython), "-m", "pip", "install", "-q", *COLAB_LIKE[runtime], *PREINSTALLED])
    freeze = subprocess.run([str(vpython), "-m", "pip", "freeze"], capture_output=True, text=True)
    (venv.parent / "pip-freeze.txt").write_text(freeze.stdout)
    return vpython


def kernel_spec(vpython: Path, where: Path) -> str:
    """A kernel spec, named after the runtime, that starts ``vpython``'s ipykernel."""
    name = f"colab-{where.name}"
    spec_dir = where / "jupyter" / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [str(vpython), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Colab-like ({where.name})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    os.environ["JUPYTER_PATH"] = str(where / "jupyter")
    return name


def execute(path: Path, kernel: str, out_dir: Path, timeout: int) -> tuple[bool, float, str]:
    """Run one notebook in a fresh kernel in an empty directory; save it executed."""
    notebook = nbformat.read(path, as_version=4)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="content-") as content:
        client = NotebookClient(
            notebook,
            kernel_name=kernel,
            timeout=timeout,
            resources={"metadata": {"path": content}},
        )
        try:
            client.execute()
            ok, error = True, ""
        except CellExecutionError as failure:
            ok, error = False, str(failure).strip().splitlines()[-1]
        except (CellTimeoutError, DeadKernelError) as failure:  # a hang, or a crash (abort)
            ok, error = False, f"{type(failure).__name__}: {failure}".splitlines()[0]
    seconds = time.monotonic() - started
    nbformat.write(notebook, out_dir / path.name)
    return ok, seconds, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--python", default="python3.12", help="the interpreter of the venv")
    parser.add_argument("--runtime", choices=sorted(COLAB_LIKE), default="gpu")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--reuse", action="store_true", help="keep an existing environment")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every twin")
    args = parser.parse_args(argv)

    where = ROOT / ".colab" / args.runtime
    where.mkdir(parents=True, exist_ok=True)
    venv = where / "venv"
    started = time.monotonic()
    if args.reuse and (venv / "bin" / "python").exists():
        vpython = venv / "bin" / "python"
    else:
        vpython = make_environment(args.python, args.runtime, venv)
    setup = time.monotonic() - started
    kernel = kernel_spec(vpython, where)

    os.environ.pop("PYTHONPATH", None)  # the kernel must find the package only once installed
    os.environ.pop("MLPERF_TUTOR_FRAMEWORKS", None)
    os.environ["MLPERF_TUTOR_SOURCE"] = str(ROOT)
    os.environ["MLPERF_TUTOR_RUNTIME"] = args.runtime
    notebooks = [p.resolve() for p in args.notebooks] or sorted((ROOT / "book").rglob("*.ipynb"))
    out_dir = where / "executed"
    out_dir.mkdir(exist_ok=True)
    lines = [f"environment: {setup:.0f} s ({args.runtime}, {vpython})"]
    print(lines[0], flush=True)
    failed = 0
    for path in notebooks:
        run([str(vpython), "-m", "pip", "uninstall", "-q", "-y", "mlperf-tutor"])
        ok, seconds, error = execute(path, kernel, out_dir, args.timeout)
        skips = (out_dir / path.name).read_text().count(SKIP_LINE)
        line = f"{'ok  ' if ok else 'FAIL'} {path.relative_to(ROOT)}: {seconds:.0f} s"
        line += f", {skips} cells skipped for a missing framework" if skips else ""
        line += f" -- {ANSI_COLOUR.sub('', error)}" if error else ""
        print(line, flush=True)
        lines.append(line)
        failed += not ok
    lines.append(f"total: {time.monotonic() - started:.0f} s, {failed} failed")
    print(lines[-1])
    (where / "summary.txt").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

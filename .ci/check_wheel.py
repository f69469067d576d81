"""Check that a wheel holds every file of the package that git tracks (modules and package data,
e.g. mlperf_tutor/mlperf/data/*.csv), and the ``mlperf-tutor`` command.

    python .ci/check_wheel.py dist/mlperf_tutor-0.1.0-py3-none-any.whl
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
        scripts = archive.read(entry_points).decode() if entry_points else ""
    tracked = subprocess.run(
        ["git", "ls-files", "mlperf_tutor"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    missing = sorted(set(tracked) - names)
    if missing:
        raise SystemExit(f"{wheel} lacks {len(missing)} package file(s): {missing}")
    if "mlperf-tutor = mlperf_tutor.cli:main" not in scripts:
        raise SystemExit(f"{wheel} has no mlperf-tutor command in its entry points")
    print(f"{wheel}: all {len(tracked)} package files and the mlperf-tutor command")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python .ci/check_wheel.py WHEEL")
    main(sys.argv[1])

"""Reference convergence points (RCPs) and their pruning, drawn per benchmark.

The RCPs are the JSON files that ship with ``mlperf-logging`` (a dependency of the package):
``mlperf_logging/rcp_checker/training_<ruleset>/rcps_<benchmark>.json``, one record per global
batch size with the epochs (or samples) each reference run needed to converge. The checker
compares a submission with the *pruned* points only. The pruning, as the rules' section
"Reference Convergence Points" and the checker describe it:

1. drop every point with a smaller batch size than the point that converges fastest, so the
   smallest batch size left converges fastest;
2. walk the rest in batch-size order and drop a point whose mean is slower than the linear
   interpolation of its two neighbours; step back after each drop.

The mean of a point is the olympic mean of its runs (one run dropped at each end; four for
``unet3d``, which has 40 runs).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The records' key for the convergence list; llama2_70b_lora's files count samples.
_KEYS = ("Epochs to converge", "samples to converge")


class Point(NamedTuple):
    """One reference convergence point: a batch size and its runs."""

    benchmark: str
    name: str
    batch_size: int
    runs: tuple[float, ...]

    @property
    def mean(self) -> float:
        drop = 4 if self.benchmark == "unet3d" else 1
        kept = sorted(self.runs)[drop : len(self.runs) - drop]
        return sum(kept) / len(kept)


def load(benchmark: str, ruleset: str = "4.0.0") -> list[Point]:
    """The RCPs of ``benchmark`` under ``ruleset``, sorted by batch size.

    Raises:
        ValueError: no RCP file for that benchmark and ruleset; the message lists those there are.
    """
    folder = resources.files("mlperf_logging") / "rcp_checker" / f"training_{ruleset}"
    path = folder / f"rcps_{benchmark}.json"
    if not path.is_file():
        there = sorted(
            p.name.removeprefix("rcps_").removesuffix(".json")
            for p in (folder.iterdir() if folder.is_dir() else [])
        )
        raise ValueError(
            f"no RCP file {path.name} for ruleset {ruleset!r} in mlperf-logging; "
            f"benchmarks with RCPs there: {there or 'none (unknown ruleset)'}"
        )
    records = json.loads(path.read_text())
    points = []
    for name, record in records.items():
        runs = next(record[k] for k in _KEYS if k in record)
        points.append(Point(benchmark, name, int(record["BS"]), tuple(float(r) for r in runs)))
    return sorted(points, key=lambda p: p.batch_size)


def prune(points: list[Point]) -> list[Point]:
    """The points the RCP check uses (see the module docstring), in batch-size order."""
    fastest = min(points, key=lambda p: p.mean)
    kept = [p for p in points if p.batch_size >= fastest.batch_size]
    i = 1
    while i < len(kept) - 1:
        low, point, high = kept[i - 1], kept[i], kept[i + 1]
        share = (point.batch_size - low.batch_size) / (high.batch_size - low.batch_size)
        if point.mean > low.mean + share * (high.mean - low.mean):
            del kept[i]
            i -= 1
        i += 1
    return kept


def pruning(benchmarks: tuple[str, ...], ruleset: str = "4.0.0") -> Figure:
    """One panel per benchmark: every RCP's mean against its batch size, the kept points joined by
    a line, the pruned ones crossed out.

    The artists carry gids: ``kept:<benchmark>`` (the line) and ``pruned:<benchmark>``.

    Args:
        benchmarks: the benchmarks to draw, e.g. ``mlperf_tutor.mlperf.results.BENCHMARKS``.
        ruleset: the training ruleset whose RCP files to read.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    columns = min(3, len(benchmarks))
    rows = -(-len(benchmarks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, benchmark in zip(axes.flat, benchmarks, strict=False):
        points = load(benchmark, ruleset)
        kept = prune(points)
        dropped = [p for p in points if p not in kept]
        for p in points:  # every run, faint
            ax.scatter([p.batch_size] * len(p.runs), p.runs, s=6, color="grey", alpha=0.3)
        (line,) = ax.plot(
            [p.batch_size for p in kept],
            [p.mean for p in kept],
            "o-",
            color="#2171b5",
            label="kept (mean)",
        )
        line.set_gid(f"kept:{benchmark}")
        marks = ax.scatter(
            [p.batch_size for p in dropped],
            [p.mean for p in dropped],
            marker="x",
            s=50,
            color="#cb181d",
            label="pruned (mean)",
            zorder=3,
        )
        marks.set_gid(f"pruned:{benchmark}")
        ax.set(xscale="log", title=benchmark, xlabel="global batch size")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(benchmarks) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("epochs or samples to converge")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Reference convergence points, training {ruleset}: kept and pruned", fontsize=11)
    fig.tight_layout()
    return fig

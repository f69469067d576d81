"""MLPerf Training v4.0 time-to-train scores, computed as ``mlperf_logging.result_summarizer`` does.

Reference: ``mlperf_logging/result_summarizer/result_summarizer.py``
(``_compute_strong_score_standalone``) and ``mlperf_logging/benchmark_meta.py`` in
https://github.com/mlcommons/logging.

For every benchmark folder (a folder holding ``result_*.txt`` logs, laid out as
``<dir>/<benchmark>/result_N.txt`` or ``<submitter>/results/<system>/<benchmark>/result_N.txt``):

* a run's time is ``(run_stop time_ms - run_start time_ms) / 60 / 1000`` minutes;
* a run whose ``run_stop`` status is not ``success`` is non-converged: it counts as slower than
  every converged run, and at most one is allowed (four for unet3d);
* the score is the olympic mean: sort the converged times, drop the fastest one and the slowest
  one (four and four for unet3d), non-converged runs filling the slow end first;
* the mean is multiplied by ``scaling_factor`` from ``scaling.json`` in the benchmark folder, if
  there is one (review committees add it; the summarizer reads it nowhere else).

Where this is stricter than the summarizer, which scores whatever it can and prints a notice: a
log without ``run_start``/``run_stop``, an unparsable ``:::MLLOG`` line, or more non-converged
runs than allowed are errors here (the summarizer drops such a run, or leaves the cell empty); too
few runs is an error, as in ``mlperf_logging.package_checker``. The summarizer also drops runs
that fail its compliance checker (e.g. the target accuracy never reached); this module trusts the
``run_stop`` status instead and checks no other key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Runs a benchmark folder must hold in MLPerf Training v4.0 (``benchmark_meta``'s
#: ``_ALL_RESULT_FILE_COUNTS['training']`` for the v4.0 benchmarks).
RUN_COUNTS = {
    "bert": 10,
    "dlrm_dcnv2": 10,
    "gpt3": 3,
    "resnet": 5,
    "ssd": 5,
    "unet3d": 40,
    "stable_diffusion": 10,
    "llama2_70b_lora": 10,
    "gnn": 10,
}

_TOKEN = ":::MLLOG "
_LAYOUTS = "<dir>/<benchmark>/result_N.txt or <submitter>/results/<system>/<benchmark>/result_N.txt"


@dataclass(frozen=True)
class BenchmarkScore:
    """The time-to-train score of one benchmark folder.

    Attributes:
        system: name of the folder above the benchmark folder (the system in a submission tree).
        benchmark: the benchmark, from the folder name and every log's ``submission_benchmark``.
        minutes: olympic mean of the run times in minutes, times ``scaling_factor``.
        runs: ``result_*.txt`` files in the folder.
        used: runs averaged into ``minutes``.
        dropped: converged runs left out by the olympic mean (fastest and slowest).
        non_converged: runs whose ``run_stop`` status is not ``success``.
        scaling_factor: from ``scaling.json`` in the benchmark folder; 1.0 without one.
    """

    system: str
    benchmark: str
    minutes: float
    runs: int
    used: int
    dropped: int
    non_converged: int
    scaling_factor: float


@dataclass(frozen=True)
class Scores:
    """The scores of every benchmark folder found, in path order, with a printable table."""

    rows: tuple[BenchmarkScore, ...]

    def __iter__(self) -> Iterator[BenchmarkScore]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def table(self) -> str:
        """One line per benchmark folder under a header; minutes to three decimals."""
        header = ("system", "benchmark", "minutes", "runs", "used", "dropped", "non-conv", "scale")
        lines = [
            (
                r.system,
                r.benchmark,
                f"{r.minutes:.3f}",
                str(r.runs),
                str(r.used),
                str(r.dropped),
                str(r.non_converged),
                f"{r.scaling_factor:.6g}",
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        # Names left-aligned, numbers right-aligned, as in the summarizer's printed frame.
        fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
        return "\n".join(fmt.format(*row).rstrip() for row in [header, *lines])


@dataclass(frozen=True)
class _Run:
    path: Path
    benchmark: str
    minutes: float
    converged: bool


def _read_run(path: Path) -> _Run:
    """Parse one log the way ``mlp_parser`` does and keep what scoring needs."""
    records = []
    # latin-1 never fails to decode, so a stray byte in a log cannot abort the parse.
    with path.open(encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            if _TOKEN not in line:
                continue
            # Launchers prefix lines ("[1,0]<stdout>:"); the record starts after the last token.
            text = line[line.rindex(_TOKEN) + len(_TOKEN) :].strip()
            try:
                record = json.loads(text)
                records.append((record["key"], float(record["time_ms"]), record))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{path}, line {lineno}: unreadable :::MLLOG record ({err}); fix or "
                    "regenerate the log"
                ) from None
    benchmarks = [r.get("value") for key, _, r in records if key == "submission_benchmark"]
    if not benchmarks:
        raise ValueError(
            f"{path} has no submission_benchmark record; log one with "
            "mllog's constants.SUBMISSION_BENCHMARK at the start of the run"
        )
    # The summarizer's loop: the last run_start seen before the first run_stop, then that stop.
    start = stop = None
    status = None
    for key, time_ms, record in records:
        if key == "run_start":
            start = time_ms
        if key == "run_stop":
            stop = time_ms
            status = (record.get("metadata") or {}).get("status")
        if start is not None and stop is not None:
            break
    for name, value in (("run_start", start), ("run_stop", stop)):
        if value is None:
            raise ValueError(
                f"{path} has no {name} record, so the run has no time; rerun it or replace the "
                "file with a finished run's log"
            )
    return _Run(path, str(benchmarks[0]), (stop - start) / 60 / 1000, status == "success")


def _benchmark_of(folder: Path, runs: list[_Run]) -> str:
    """The folder's benchmark; logs must agree with each other and with the folder name."""
    by_benchmark: dict[str, list[str]] = {}
    for run in runs:
        by_benchmark.setdefault(run.benchmark, []).append(run.path.name)
    if len(by_benchmark) > 1:
        found = "; ".join(f"{b}: {', '.join(sorted(n))}" for b, n in sorted(by_benchmark.items()))
        raise ValueError(
            f"{folder} mixes benchmarks in its logs' submission_benchmark ({found}); keep one "
            "benchmark per folder"
        )
    (benchmark,) = by_benchmark
    # The summarizer takes the benchmark from the folder name, so the two must agree.
    if benchmark != folder.name:
        raise ValueError(
            f"{folder} holds {benchmark} logs (submission_benchmark) but is named "
            f"{folder.name!r}; rename the folder to {benchmark!r} or move the logs"
        )
    if benchmark not in RUN_COUNTS:
        raise ValueError(
            f"{folder}: {benchmark!r} is not an MLPerf Training v4.0 benchmark; expected one of "
            f"{', '.join(RUN_COUNTS)}"
        )
    return benchmark


def _scaling_factor(folder: Path) -> float:
    path = folder / "scaling.json"
    if not path.is_file():
        return 1.0
    try:
        return float(json.loads(path.read_text())["scaling_factor"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a JSON object with a numeric scaling_factor ({err}); fix or remove it"
        ) from None


def _score_folder(folder: Path, files: list[Path]) -> BenchmarkScore:
    runs = [_read_run(path) for path in files]
    benchmark = _benchmark_of(folder, runs)
    needed = RUN_COUNTS[benchmark]
    if len(runs) < needed:
        raise ValueError(
            f"{folder} has {len(runs)} result_*.txt file(s) but {benchmark} needs {needed} runs in "
            "MLPerf Training v4.0; add the missing runs"
        )
    times = sorted(run.minutes for run in runs if run.converged)
    non_converged = len(runs) - len(times)
    drop = 4 if benchmark == "unet3d" else 1
    if non_converged > drop:
        raise ValueError(
            f"{folder} has {non_converged} runs whose run_stop status is not 'success' but "
            f"{benchmark} allows at most {drop}, so it has no score; rerun the failed runs"
        )
    # Non-converged runs are the slowest, so they take the first places of the slow-end drop.
    used = times[drop : len(times) - (drop - non_converged)]
    scaling_factor = _scaling_factor(folder)
    # Same operations in the same order as the summarizer, so the float is bit-identical.
    minutes = sum(used) * 1.0 / len(used) * scaling_factor
    return BenchmarkScore(
        system=folder.parent.name,
        benchmark=benchmark,
        minutes=minutes,
        runs=len(runs),
        used=len(used),
        dropped=len(times) - len(used),
        non_converged=non_converged,
        scaling_factor=scaling_factor,
    )


def score(results_dir: str | Path) -> Scores:
    """Score every benchmark folder under ``results_dir`` as the official summarizer does.

    Args:
        results_dir: a benchmark folder, a system folder (``<dir>/<benchmark>/result_N.txt``), a
            submitter folder (``<submitter>/results/<system>/<benchmark>/``), or any folder above
            them; every folder holding ``result_*.txt`` files is one benchmark folder.

    Returns:
        :class:`Scores`, one :class:`BenchmarkScore` per benchmark folder; ``.table()`` prints.

    Raises:
        ValueError: the folder is missing or holds no logs; a benchmark folder has too few runs,
            too many non-converged runs, logs of another or of several benchmarks, or a log
            without ``run_start``/``run_stop``.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; pass a results folder laid out as {_LAYOUTS}")
    folders: dict[Path, list[Path]] = {}
    for path in sorted(root.rglob("result_*.txt")):
        if path.is_file():
            folders.setdefault(path.parent, []).append(path)
    if not folders:
        raise ValueError(f"{root} holds no result_*.txt logs; expected {_LAYOUTS}")
    return Scores(tuple(_score_folder(folder, files) for folder, files in folders.items()))

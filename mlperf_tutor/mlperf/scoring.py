"""MLPerf Training time-to-train scores, computed as ``mlperf_logging.result_summarizer`` does.

Reference: ``mlperf_logging/result_summarizer/result_summarizer.py`` (``_read_result_file``,
``_query_run_start_stop``, ``_compute_strong_score_standalone``, ``_compute_olympic_average``,
``_get_scaling_factor``), ``compliance_checker/mlp_parser/ruleset_*.py`` and ``benchmark_meta.py``
in https://github.com/mlcommons/logging, read at mlperf-logging 4.1.68 (rulesets 4.0.0 to 6.1.0).

For every benchmark folder (a folder holding ``result_*.txt`` logs, laid out as
``<dir>/<benchmark>/result_N.txt`` or ``<submitter>/results/<system>/<benchmark>/result_N.txt``),
as the summarizer does:

* the benchmark is the folder's name, one of the ruleset's benchmarks;
* a run is *non-converged* and left out when mlperf-logging's compliance checker fails it for the
  ruleset (a closed run whose ``eval_accuracy`` never reached the target, a missing or
  repeated-with-another-value key, an unreadable ``:::MLLOG`` line, a hyperparameter the closed
  division fixes, ...). The ``run_stop`` status is never read: an ``aborted`` run that passes the
  checker counts at its time like any other, and a ``success`` that fails it is left out;
* a run's time is ``(run_stop time_ms - run_start time_ms) / 60 / 1000`` minutes, from the last
  ``run_start`` before the first ``run_stop``;
* the score is the olympic mean: sort the times of the scored runs, drop the fastest one and the
  slowest one (four and four for unet3d), non-converged runs filling the slow end first; more
  non-converged runs than that leave no score;
* the mean is multiplied by ``scaling_factor`` from ``scaling.json`` in the benchmark folder, if
  there is one (review committees add it).

The compliance rules themselves are not restated here: each run is passed to the installed
``mlperf_logging.compliance_checker`` (a dependency), exactly as the summarizer passes it, so the
verdicts agree for every benchmark and ruleset. Everything else (reading the logs, which runs
count, times, olympic mean, scaling) is this module's own.

Where the summarizer gives no answer, or one that is not reproducible, this module refuses with a
:class:`ScoreError` naming the file instead of guessing:

* a log line that makes the summarizer stop with a traceback (a record that is not a JSON object,
  has no ``time_ms``/``key``/``value``/``metadata`` or a ``time_ms`` that is not a number),
  a ``submission_division`` other than ``closed``/``open`` (the checker then opens a file named
  after the value: a missing one stops it, a ``../`` path makes it run code from elsewhere), or
  any other error of the checker;
* a ``run_start`` or ``run_stop`` time that is NaN: the summarizer sorts such a time wherever the
  directory listing happens to put it, so its score changes with the order of the files;
* more non-converged runs than the olympic mean drops (the summarizer leaves the cell empty), or a
  score that is not finite (infinite times inside the mean);
* a folder whose run count is not the benchmark's (``mlperf_logging.package_checker`` refuses it;
  the summarizer averages whatever is there), a folder named after no benchmark of the ruleset,
  logs of another benchmark than the folder's (the summarizer scores them under the folder's
  name), a ``result_*.txt`` that is not a regular file, and a ``scaling.json`` without a finite
  positive numeric ``scaling_factor``.

A closed folder's RCP check, which the summarizer runs after scoring it, can rewrite or delete its
``scaling.json``, so a second summarizer run over the same tree may differ from the first. This
module writes nothing and agrees with a first run.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlperf_tutor.core.files import read_json, regular_file

#: Rulesets scored here, each checked against the summarizer (tests/test_score_summarizer.py);
#: those the installed mlperf-logging has are usable.
RULESETS = ("4.0.0", "4.1.0", "5.0.0", "5.1.0", "6.0.0", "6.1.0")
#: The ruleset of the package's own logs (``mlperf_tutor.mlperf.mllog.RULESET``).
DEFAULT_RULESET = "4.0.0"

#: Runs a benchmark folder must hold in MLPerf Training v4.0 (``benchmark_meta``'s
#: ``_ALL_RESULT_FILE_COUNTS['training']`` for the v4.0 benchmarks). Other rulesets read the
#: installed mlperf-logging's table.
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
# The summarizer's stop: the last line of its traceback is all a user would see.
_CRASH = "the official summarizer stops with a traceback on it"


class ScoreError(ValueError):
    """A results folder that cannot be scored as the official summarizer scores it; the message
    names the file (and line) and what to do."""


@dataclass(frozen=True)
class BenchmarkScore:
    """The time-to-train score of one benchmark folder.

    Attributes:
        system: name of the folder above the benchmark folder (the system in a submission tree).
        benchmark: the benchmark: the folder's name, which every log's ``submission_benchmark``
            names.
        minutes: olympic mean of the scored runs' times in minutes, times ``scaling_factor``.
        runs: ``result_*.txt`` files in the folder.
        used: runs averaged into ``minutes``.
        dropped: scored runs left out by the olympic mean (fastest and slowest).
        non_converged: runs left out before the mean, as the summarizer's "non-converged runs":
            failed by the compliance checker (which includes unreadable lines) or without a
            ``run_start``/``run_stop``. One entry each in ``failures``.
        scaling_factor: from ``scaling.json`` in the benchmark folder; 1.0 without one.
        failures: ``(file name, reason)`` of each non-converged run, in file name order.
    """

    system: str
    benchmark: str
    minutes: float
    runs: int
    used: int
    dropped: int
    non_converged: int
    scaling_factor: float
    failures: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Scores:
    """The scores of every benchmark folder found, in path order, with a printable table."""

    rows: tuple[BenchmarkScore, ...]
    ruleset: str = DEFAULT_RULESET

    def __iter__(self) -> Iterator[BenchmarkScore]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def table(self) -> str:
        """One line per benchmark folder under a header (minutes to three decimals), then one line
        per non-converged run with the reason it was left out."""
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
        out = [fmt.format(*row).rstrip() for row in [header, *lines]]
        for r in self.rows:
            for name, reason in r.failures:
                out.append(f"not scored: {r.system}/{r.benchmark}/{name}: {reason}")
        return "\n".join(out)


@dataclass(frozen=True)
class _Record:
    line: int  # line number in the file, from 1
    key: object  # a string in any sane log; whatever JSON value the line holds
    time_ms: float
    value: object


@dataclass(frozen=True)
class _Log:
    path: Path
    records: tuple[_Record, ...]
    unreadable: tuple[str, ...]  # "line N: why" for each line the summarizer's parser rejects

    def first(self, key: str) -> _Record | None:
        return next((r for r in self.records if r.key == key), None)


@dataclass(frozen=True)
class _Rules:
    """What the installed mlperf-logging says about one ruleset."""

    ruleset: str
    benchmarks: tuple[str, ...]
    counts: dict[str, int]
    checker: object  # the module mlperf_logging.compliance_checker.mlp_compliance


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {list: "array", str: "string", int: "number", float: "number"}.get(type(value), "value")


def _record(path: Path, lineno: int, line: str) -> _Record:
    """One ``:::MLLOG`` line, read as ``mlp_parser`` reads it.

    Raises ValueError where the parser reports a parse failure (the summarizer drops the run) and
    ScoreError where the parser raises something else (the summarizer stops).
    """

    def crash(why: str) -> ScoreError:
        return ScoreError(
            f"{path}, line {lineno}: the :::MLLOG record {why}; {_CRASH}, so the folder has no "
            "official score. Fix or regenerate the log"
        )

    # The parser keeps what follows the last token on the line, then strips the whole.
    text = line[line.rindex(_TOKEN) :].strip()
    if not text.startswith(_TOKEN):
        raise ValueError("no record after ':::MLLOG'")
    try:
        record = json.loads(text[len(_TOKEN) :])
    except RecursionError:
        raise crash("is nested too deeply to parse") from None
    except ValueError as err:
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(record, dict):
        raise crash(f"is a JSON {_json_kind(record)}, not an object")
    if "time_ms" not in record:
        raise crash("has no time_ms field")
    try:
        time_ms = float(record["time_ms"])
    except ValueError:
        raise ValueError(f"time_ms {record['time_ms']!r} is not a number") from None
    except (TypeError, OverflowError):
        raise crash(f"has a time_ms that is not a number ({record['time_ms']!r:.60})") from None
    # The parser reads them in this order, so the first missing one is the one it stops at.
    for field in ("key", "value", "metadata"):
        if field not in record:
            raise crash(f"has no {field} field")
    return _Record(lineno, record["key"], time_ms, record["value"])


def _read_log(path: Path) -> _Log:
    records, unreadable = [], []
    # latin-1, as the parser reads: every byte decodes, so no log fails on its encoding.
    with path.open(encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            if _TOKEN not in line:
                continue
            try:
                records.append(_record(path, lineno, line))
            except ScoreError:
                raise
            except ValueError as err:
                unreadable.append(f"line {lineno}: unreadable :::MLLOG record ({err})")
    return _Log(path, tuple(records), tuple(unreadable))


def _check_division(log: _Log) -> None:
    # The checker's common.yaml loads '<value>_common.yaml' for the first submission_division,
    # whatever the value: only these two name its own files.
    record = log.first("submission_division")
    if record is not None and record.value not in ("closed", "open"):
        raise ScoreError(
            f"{log.path}, line {record.line}: submission_division is {record.value!r}, not "
            f"'closed' or 'open'; the compliance checker then opens a rules file named after the "
            f"value and {_CRASH} (or, for a path, reads rules from elsewhere). Log 'closed' or "
            "'open'"
        )


def _check_benchmarks(folder: Path, logs: list[_Log]) -> None:
    """Every log's (first) ``submission_benchmark`` must be the folder's benchmark."""
    by_benchmark: dict[str, list[str]] = {}
    for log in logs:
        record = log.first("submission_benchmark")
        if record is not None:
            name = record.value if isinstance(record.value, str) else repr(record.value)
            by_benchmark.setdefault(name, []).append(log.path.name)
    others = sorted(b for b in by_benchmark if b != folder.name)
    if not others:
        return
    if len(by_benchmark) > 1:
        found = "; ".join(f"{b}: {', '.join(sorted(n))}" for b, n in sorted(by_benchmark.items()))
        raise ScoreError(
            f"{folder} mixes benchmarks in its logs' submission_benchmark ({found}); keep one "
            "benchmark per folder, named after it"
        )
    # The summarizer would score them under the folder's name.
    raise ScoreError(
        f"{folder} holds {others[0]} logs (submission_benchmark) but is named {folder.name!r}; "
        f"rename the folder to {others[0]!r} or move the logs"
    )


@contextmanager
def _no_logging_setup():
    # The checker logs through the root logger's module functions, which install a stderr handler
    # when the root logger has none; a NullHandler meanwhile keeps a caller's logging untouched.
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard is not None:
            root.removeHandler(guard)


class _CachedYaml:
    """Stands in for ``yaml`` inside the compliance checker while folders are scored.

    The checker parses its rules files again for every log, which is nine tenths of its time; this
    parses each once (keyed on path, modification time and size) and hands out a deep copy, the
    same value a fresh parse gives.
    """

    _parsed: dict = {}

    def __init__(self, yaml):
        self._yaml = yaml

    def __getattr__(self, name):
        return getattr(self._yaml, name)

    def load(self, stream, Loader):  # noqa: N803 -- yaml.load's own argument name
        name = getattr(stream, "name", None)
        if not isinstance(name, str):
            return self._yaml.load(stream, Loader=Loader)
        info = os.fstat(stream.fileno())
        key = (name, info.st_mtime_ns, info.st_size, Loader)
        if key not in self._parsed:
            self._parsed[key] = self._yaml.load(stream, Loader=Loader)
        return copy.deepcopy(self._parsed[key])


@contextmanager
def _rules_parsed_once(checker):
    yaml = getattr(checker, "yaml", None)
    if yaml is None or not hasattr(yaml, "load"):
        yield
        return
    checker.yaml = _CachedYaml(yaml)
    try:
        yield
    finally:
        checker.yaml = yaml


def _compliance(path: Path, rules: _Rules) -> list[str]:
    """The checker's messages on one log, as the summarizer runs it; empty when it passes."""
    checker = rules.checker.make_checker(
        usage="training", ruleset=rules.ruleset, quiet=True, werror=False
    )
    try:
        with _no_logging_setup():
            valid = checker.check_file(str(path), f"training_{rules.ruleset}/common.yaml")
    except Exception as err:  # anything the checker raises stops the summarizer too
        raise ScoreError(
            f"{path}: mlperf-logging's compliance checker fails on this log "
            f"({type(err).__name__}: {err}); {_CRASH}, so the folder has no official score"
        ) from None
    finally:
        # Rules files still queued after an error would be applied to the next log.
        queue = getattr(rules.checker, "enqueued_configs", None)
        if isinstance(queue, list):
            queue.clear()
    if valid:
        return []
    return [*checker.overwritable.values(), *checker.not_overwritable]


def _summary(messages: list[str]) -> str:
    """A message's first line, and the failed test where it names one."""
    parts = []
    for message in messages:
        lines = [line.strip() for line in message.splitlines()] or [""]
        test = next((line for line in lines if line.startswith("failed test:")), None)
        parts.append(f"{lines[0]} ({test})" if test and test != lines[0] else lines[0])
    return "; ".join(parts)


def _run_time(log: _Log) -> float | str:
    """Minutes of a compliant run, or why it has none (the summarizer drops such a run)."""
    start = stop = None
    for record in log.records:
        if record.key == "run_start":
            start = record
        if record.key == "run_stop":
            stop = record
        if start is not None and stop is not None:
            break
    for name, record in (("run_start", start), ("run_stop", stop)):
        if record is None:
            return f"{name} not recorded"
        if math.isnan(record.time_ms):
            raise ScoreError(
                f"{log.path}, line {record.line}: the {name} time_ms is NaN; the official "
                "summarizer sorts a NaN time wherever the directory listing puts it, so its "
                "score changes with the order of the files. Fix or rerun the run"
            )
    return (stop.time_ms - start.time_ms) / 60 / 1000


def _scaling_factor(folder: Path) -> float:
    path = folder / "scaling.json"
    if not path.is_file():  # the summarizer reads it only when it is a file
        return 1.0
    content = read_json(path, ScoreError, "scaling.json", within=folder)
    factor = content.get("scaling_factor")
    ok = isinstance(factor, (int, float)) and not isinstance(factor, bool)
    if not ok or not math.isfinite(factor) or factor <= 0:
        raise ScoreError(
            f"{path}: scaling_factor is {factor!r}; it must be a finite positive number (the "
            "summarizer multiplies the score by it). Fix or remove the file"
        )
    return factor


def _score_folder(folder: Path, files: list[Path], rules: _Rules) -> BenchmarkScore:
    benchmark = folder.name
    if benchmark not in rules.benchmarks:
        raise ScoreError(
            f"{folder}: {benchmark!r} is not a benchmark of MLPerf Training ruleset "
            f"{rules.ruleset}; name the folder after one of {', '.join(rules.benchmarks)}"
        )
    logs = [_read_log(regular_file(path, ScoreError, "result log")) for path in files]
    _check_benchmarks(folder, logs)
    for log in logs:
        _check_division(log)
    needed = rules.counts[benchmark]
    if len(logs) != needed:
        raise ScoreError(
            f"{folder} has {len(logs)} result_*.txt file(s) but {benchmark} needs exactly "
            f"{needed} runs (mlperf_logging.package_checker refuses any other count); "
            f"{'add the missing' if len(logs) < needed else 'remove the extra'} runs"
        )
    scaling_factor = _scaling_factor(folder)
    times, failures = [], []
    for log in logs:
        # Run on every log, even an unreadable one, as the summarizer does: it may stop on it.
        messages = _compliance(log.path, rules)
        if log.unreadable:
            more = f" (and {len(log.unreadable) - 1} more)" if len(log.unreadable) > 1 else ""
            failures.append((log.path.name, log.unreadable[0] + more))
        elif messages:
            failures.append((log.path.name, "compliance: " + _summary(messages)))
        elif isinstance(minutes := _run_time(log), str):
            failures.append((log.path.name, minutes))
        else:
            times.append(minutes)
    drop = 4 if benchmark == "unet3d" else 1
    if len(failures) > drop:
        listed = "; ".join(f"{name}: {reason}" for name, reason in failures)
        raise ScoreError(
            f"{folder} has {len(failures)} non-converged runs but {benchmark} allows at most "
            f"{drop}, so it has no score (the summarizer leaves it empty): {listed}"
        )
    times.sort()
    # Non-converged runs are the slowest, so they take the first places of the slow-end drop.
    used = times[drop : len(times) - (drop - len(failures))]
    # Same operations in the same order as the summarizer, so the float is bit-identical.
    minutes = sum(used) * 1.0 / len(used) * scaling_factor
    if not math.isfinite(minutes):
        raise ScoreError(
            f"{folder}: the olympic mean is {minutes} minutes, because a run_start or run_stop "
            "time_ms is infinite; fix or rerun those runs"
        )
    return BenchmarkScore(
        system=folder.parent.name,
        benchmark=benchmark,
        minutes=minutes,
        runs=len(logs),
        used=len(used),
        dropped=len(times) - len(used),
        non_converged=len(failures),
        scaling_factor=scaling_factor,
        failures=tuple(failures),
    )


def _version(ruleset: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(ruleset).split("."))
    except ValueError:
        return ()


def _load_rules(ruleset: str) -> _Rules:
    import importlib.metadata

    from mlperf_logging import benchmark_meta
    from mlperf_logging.compliance_checker import mlp_compliance

    rules_dir = Path(mlp_compliance.__file__).parent
    available = [r for r in RULESETS if (rules_dir / f"training_{r}" / "common.yaml").is_file()]
    if ruleset not in available:
        version = importlib.metadata.version("mlperf-logging")
        newer = _version(ruleset) > _version(RULESETS[-1])
        hint = "this module has not been checked against it" if newer else "pass one of those"
        if ruleset in RULESETS:
            hint = "upgrade mlperf-logging"
        raise ScoreError(
            f"ruleset {ruleset!r} cannot be scored: with mlperf-logging {version} installed, the "
            f"rulesets scored here are {', '.join(available)}; {hint}"
        )
    benchmarks = tuple(dict.fromkeys(benchmark_meta.get_allowed_benchmarks("training", ruleset)))
    counts = benchmark_meta.get_result_file_counts("training")
    return _Rules(ruleset, benchmarks, {b: counts[b] for b in benchmarks}, mlp_compliance)


def score(results_dir: str | Path, ruleset: str = DEFAULT_RULESET) -> Scores:
    """Score every benchmark folder under ``results_dir`` as the official summarizer does.

    Args:
        results_dir: a benchmark folder, a system folder (``<dir>/<benchmark>/result_N.txt``), a
            submitter folder (``<submitter>/results/<system>/<benchmark>/``), or any folder above
            them; every folder holding ``result_*.txt`` files is one benchmark folder.
        ruleset: the MLPerf Training ruleset of the logs (``result_summarizer``'s ``ruleset``
            argument), one of :data:`RULESETS` that the installed mlperf-logging has.

    Returns:
        :class:`Scores`, one :class:`BenchmarkScore` per benchmark folder; ``.table()`` prints.

    Raises:
        ScoreError: (a ValueError) the folder is missing or holds no logs, the ruleset is unknown,
            or a folder cannot be scored (see the module docstring for every case).
    """
    rules = _load_rules(ruleset)
    root = Path(results_dir)
    if not root.is_dir():
        raise ScoreError(f"{root} is not a folder; pass a results folder laid out as {_LAYOUTS}")
    folders: dict[Path, list[Path]] = {}
    for path in sorted(root.rglob("result_*.txt")):
        folders.setdefault(path.parent, []).append(path)
    if not folders:
        raise ScoreError(f"{root} holds no result_*.txt logs; expected {_LAYOUTS}")
    with _rules_parsed_once(rules.checker):
        rows = tuple(_score_folder(folder, files, rules) for folder, files in folders.items())
    return Scores(rows, ruleset)

"""Time-to-train scoring on real MLPerf v4.0 logs: the summarizer's numbers, and every refusal.

tests/test_score_summarizer.py runs the summarizer itself on logs it writes (every ruleset); this
module holds the fixed numbers of the v4.0 logs and the cases that never reach it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

from mlperf_tutor import cli
from mlperf_tutor.mlperf import ScoreError, score, scoring
from mlperf_tutor.mlperf.mllog import RULESET
from mlperf_tutor.mlperf.scoring import RUN_COUNTS

# Real v4.0 result logs, copied unedited into the repository (see tests/data/README.md).
LOGS = Path(__file__).resolve().parent / "data" / "mlperf_training_v4.0" / "logs"
GPT3 = LOGS / "Google" / "results" / "cloud-tpu-v5p-1024-maxtext" / "gpt3"
H200 = LOGS / "NVIDIA" / "results" / "h200_ngc24.04_nemo" / "llama2_70b_lora"
GAUDI2 = LOGS / "Intel-HabanaLabs" / "results" / "HLS-Gaudi2-PT" / "llama2_70b_lora"

# Computed once with mlperf-logging 4.1.68, on a temp copy of LOGS (already laid out as
# <submitter>/{results,systems}/...):
#   python -m mlperf_logging.result_summarizer "logs/{*}" training 4.0.0 --csv out.csv
# They equal the rows of the official v4.0 summary (the package's summary_v4.0.csv) for
# tpu-v5p-1024 gpt3, HLS-Gaudi2-PT llama2_70b_lora and NVIDIA H200 (8x H200-SXM-141GB)
# llama2_70b_lora, to the last digit.
SUMMARIZER_MINUTES = {
    "cloud-tpu-v5p-1024-maxtext": 114.79388333333333,
    "HLS-Gaudi2-PT": 78.10868886083051,
    "h200_ngc24.04_nemo": 24.689164583333334,
}
# Same summarizer and version on a copy of LOGS/NVIDIA where H200 result_8.txt (the fastest run)
# never reaches the target (its eval_accuracy <= 0.925 set to 0.93), so that the compliance check
# fails it (tests/test_score_summarizer.py reruns this one):
#   python -m mlperf_logging.result_summarizer NVIDIA training 4.0.0 --csv out.csv
H200_RESULT_8_MISSED_TARGET = 25.085860416666666


def copy_runs(src: Path, dst: Path, names: list[str] | None = None) -> Path:
    """Copy ``src``'s result files (all, or ``names``) into a new folder ``dst``."""
    dst.mkdir(parents=True)
    for path in sorted(src.glob("result_*.txt")):
        if names is None or path.name in names:
            shutil.copy(path, dst / path.name)
    return dst


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="latin-1")
    assert old in text, (path, old)
    path.write_text(text.replace(old, new), encoding="latin-1")


def test_run_counts_match_benchmark_meta():
    from mlperf_logging import benchmark_meta as meta

    allowed = meta.get_allowed_benchmarks("training", "4.0.0")
    counts = meta.get_result_file_counts("training")
    assert set(RUN_COUNTS) == set(allowed)
    assert RUN_COUNTS == {b: counts[b] for b in RUN_COUNTS}


def test_whole_tree_equals_official_summarizer_bit_for_bit():
    scores = score(LOGS)
    assert {r.system: r.minutes for r in scores} == SUMMARIZER_MINUTES
    assert [(r.system, r.benchmark) for r in scores] == [
        ("cloud-tpu-v5p-1024-maxtext", "gpt3"),
        ("HLS-Gaudi2-PT", "llama2_70b_lora"),
        ("h200_ngc24.04_nemo", "llama2_70b_lora"),
    ]


def test_google_gpt3_three_runs_keep_the_median():
    (row,) = score(GPT3.parents[2])  # the submitter folder: Google/results/<system>/gpt3
    assert row.benchmark == "gpt3"
    assert (row.runs, row.used, row.dropped, row.non_converged) == (3, 1, 2, 0)
    assert row.minutes == SUMMARIZER_MINUTES["cloud-tpu-v5p-1024-maxtext"]
    assert row.minutes == pytest.approx(114.79, abs=0.01)


def test_nvidia_h200_llama2_lora_olympic_mean_of_eight():
    (row,) = score(H200)  # the benchmark folder itself
    assert (row.runs, row.used, row.dropped, row.scaling_factor) == (10, 8, 2, 1.0)
    assert row.minutes == SUMMARIZER_MINUTES["h200_ngc24.04_nemo"]


def test_habana_gaudi2_llama2_lora_applies_scaling_json(tmp_path):
    (row,) = score(GAUDI2.parent)  # the system folder
    assert row.scaling_factor == 1.0033670033670032
    assert row.minutes == SUMMARIZER_MINUTES["HLS-Gaudi2-PT"]
    # The same logs without scaling.json (copy_runs copies result files only).
    (unscaled,) = score(copy_runs(GAUDI2, tmp_path / "llama2_70b_lora"))
    assert unscaled.scaling_factor == 1.0
    assert unscaled.minutes * row.scaling_factor == row.minutes


def test_default_ruleset_is_that_of_the_package_logs():
    assert scoring.DEFAULT_RULESET == RULESET == "4.0.0"


def miss_target(path: Path) -> None:
    """Every eval_accuracy of an H200 log (and run_stop's copy of the last) above llama2_70b_lora's
    closed target (<= 0.925), as a run that never converged logs them; the status stays success."""
    text = path.read_text(encoding="latin-1")
    pattern = r'("key": "(?:eval_accuracy|run_stop)", "value": )0\.9[0-9]*'
    text, n = re.subn(pattern, r"\g<1>0.93", text)
    assert n >= 2, path
    path.write_text(text, encoding="latin-1")


def test_run_that_never_reached_the_target_is_non_converged_and_matches_summarizer(tmp_path):
    folder = copy_runs(H200, tmp_path / "llama2_70b_lora")
    miss_target(folder / "result_8.txt")
    scores = score(folder)
    (row,) = scores
    assert (row.runs, row.used, row.dropped, row.non_converged) == (10, 8, 1, 1)
    assert row.minutes == H200_RESULT_8_MISSED_TARGET
    ((name, reason),) = row.failures
    assert name == "result_8.txt"
    assert reason.startswith("compliance: Failed checks for eval_accuracy")
    assert "(v['value'] <= 0.925)" in reason
    assert f"not scored: {tmp_path.name}/llama2_70b_lora/result_8.txt: compliance" in (
        scores.table()
    )


def test_aborted_run_that_reached_the_target_counts_at_its_time(tmp_path):
    # The summarizer never reads the run_stop status: the checker's verdict alone decides.
    folder = copy_runs(H200, tmp_path / "llama2_70b_lora")
    edit(folder / "result_8.txt", '"status": "success"', '"status": "aborted"')
    (row,) = score(folder)
    assert (row.used, row.dropped, row.non_converged) == (8, 2, 0)
    assert row.minutes == SUMMARIZER_MINUTES["h200_ngc24.04_nemo"]


def test_too_many_non_converged_runs_is_an_error(tmp_path):
    folder = copy_runs(H200, tmp_path / "llama2_70b_lora")
    for name in ("result_0.txt", "result_1.txt"):
        miss_target(folder / name)
    with pytest.raises(
        ScoreError, match=r"2 non-converged runs but llama2_70b_lora allows at most 1.*result_0"
    ):
        score(folder)


def test_too_few_or_too_many_runs_name_folder_and_count(tmp_path):
    copy_runs(GPT3, tmp_path / "few" / "gpt3", ["result_0.txt", "result_1.txt"])
    with pytest.raises(
        ScoreError, match=r"gpt3 has 2 result_\*\.txt file\(s\) but gpt3 needs exac"
    ):
        score(tmp_path / "few")
    folder = copy_runs(GPT3, tmp_path / "many" / "gpt3")
    shutil.copy(GPT3 / "result_0.txt", folder / "result_3.txt")
    with pytest.raises(ScoreError, match=r"has 4 .* needs exactly 3 runs .*remove the extra"):
        score(folder)


def run_minutes(log: Path) -> float:
    """(run_stop - run_start) / 60000 of a log, read here with json."""
    times = {}
    for line in log.open(encoding="latin-1"):
        if ":::MLLOG " in line:
            record = json.loads(line.split(":::MLLOG ", 1)[1])
            times.setdefault(record["key"], record["time_ms"])
    return (times["run_stop"] - times["run_start"]) / 60 / 1000


def test_log_without_run_stop_is_left_out_as_the_summarizer_does(tmp_path):
    folder = copy_runs(GPT3, tmp_path / "gpt3")
    log = folder / "result_1.txt"
    log.write_text("".join(line for line in log.open() if '"run_stop"' not in line))
    (row,) = score(folder)
    assert (row.runs, row.used, row.dropped, row.non_converged) == (3, 1, 1, 1)
    assert row.failures == (
        ("result_1.txt", "compliance: Required EXACTLY_ONE occurrence of 'run_stop' but found 0"),
    )
    # Of the two runs left, the fastest is dropped; the non-converged run takes the slow end.
    assert row.minutes == max(run_minutes(folder / f"result_{i}.txt") for i in (0, 2))


def test_mixed_benchmarks_in_one_folder_are_refused(tmp_path):
    folder = copy_runs(GPT3, tmp_path / "gpt3")
    shutil.copy(H200 / "result_0.txt", folder / "result_3.txt")
    with pytest.raises(ScoreError, match=r"mixes benchmarks.*gpt3: .*llama2_70b_lora: result_3"):
        score(folder)


def test_logs_disagreeing_with_folder_name_are_refused(tmp_path):
    copy_runs(GPT3, tmp_path / "bert")
    with pytest.raises(ScoreError, match=r"holds gpt3 logs .* named 'bert'; rename the folder"):
        score(tmp_path)


def test_folder_of_no_benchmark_of_the_ruleset_is_refused(tmp_path):
    copy_runs(GPT3, tmp_path / "gpt3")
    # gpt3 left MLPerf Training after 4.1.0.
    with pytest.raises(ScoreError, match=r"'gpt3' is not a benchmark of .* ruleset 5\.0\.0"):
        score(tmp_path, "5.0.0")


@pytest.mark.parametrize("ruleset", ["3.1.0", "9.0.0", "four", None])
def test_unknown_ruleset_is_refused(tmp_path, ruleset):
    with pytest.raises(ScoreError, match=rf"ruleset {re.escape(repr(ruleset))} cannot be scored"):
        score(GPT3, ruleset)


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ScoreError, match=r"holds no result_\*\.txt logs"):
        score(tmp_path)
    with pytest.raises(ScoreError, match=r"is not a folder"):
        score(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_result_file_that_is_not_regular_is_refused_at_once(tmp_path, kind):
    # The summarizer would open it: a FIFO blocks it forever, a directory stops it.
    folder = copy_runs(GPT3, tmp_path / "gpt3", ["result_0.txt", "result_1.txt"])
    if kind == "fifo":
        os.mkfifo(folder / "result_2.txt")
    else:
        (folder / "result_2.txt").mkdir()
    with pytest.raises(ScoreError, match=r"result_2\.txt is a (FIFO|directory).*not a regular"):
        score(folder)


# Lines on which mlperf_logging's parser raises something other than a parse error, so that the
# summarizer stops: line 100 of a copy of a gpt3 log, and what score says about it.
STOPPING_LINES = {
    "array": ("[1, 2]", "is a JSON array, not an object"),
    "no time_ms": ('{"key": "x", "value": 1, "metadata": {}}', "has no time_ms field"),
    "time_ms null": (
        '{"time_ms": null, "key": "x", "value": 1, "metadata": {}}',
        "has a time_ms that is not a number",
    ),
    "time_ms huge": (
        '{"time_ms": 1' + "0" * 400 + ', "key": "x", "value": 1, "metadata": {}}',
        "has a time_ms that is not a number",
    ),
    "no key": ('{"time_ms": 1, "value": 1, "metadata": {}}', "has no key field"),
    "no metadata": ('{"time_ms": 1, "key": "x", "value": 1}', "has no metadata field"),
    "deep": ("[" * 100_000 + "]" * 100_000, "is nested too deeply to parse"),
}


@pytest.mark.parametrize("case", list(STOPPING_LINES))
def test_line_that_stops_the_summarizer_is_refused_naming_file_and_line(tmp_path, case):
    line, message = STOPPING_LINES[case]
    folder = copy_runs(GPT3, tmp_path / "gpt3")
    with open(folder / "result_1.txt", "a", encoding="latin-1") as f:
        f.write(f"[1,0]<stdout>::::MLLOG {line}\n")
    with pytest.raises(
        ScoreError, match=rf"result_1\.txt, line 100: the :::MLLOG record {message}"
    ):
        score(folder)


def test_line_the_parser_rejects_leaves_the_run_out(tmp_path):
    # A parse error (not JSON, time_ms an unreadable string) is a dropped run, not a stop.
    folder = copy_runs(GPT3, tmp_path / "gpt3")
    with open(folder / "result_1.txt", "a", encoding="latin-1") as f:
        f.write(':::MLLOG {"time_ms": "soon", "key": "x", "value": 1, "metadata": {}}\n')
        f.write(":::MLLOG {truncated\n")
    (row,) = score(folder)
    assert row.failures == (
        (
            "result_1.txt",
            "line 100: unreadable :::MLLOG record (time_ms 'soon' is not a number) (and 1 more)",
        ),
    )


def test_division_naming_a_file_is_refused_before_the_checker_runs_it(tmp_path):
    # The checker loads '<division>_common.yaml' beside its own rules and runs the code of its
    # BEGIN block: a log can make the summarizer run a file planted in the submission.
    from mlperf_logging.compliance_checker import mlp_compliance

    marker = tmp_path / "ran"
    (tmp_path / "evil_common.yaml").write_text(
        f"- BEGIN:\n    CODE: \"open({str(marker)!r}, 'w').close()\"\n"
    )
    rules = Path(mlp_compliance.__file__).parent / "training_4.0.0"
    division = os.path.relpath(tmp_path / "evil", rules)
    folder = copy_runs(GPT3, tmp_path / "gpt3")
    edit(folder / "result_0.txt", '"value": "closed"', json.dumps(division).join(['"value": ', ""]))
    with pytest.raises(ScoreError, match=r"result_0\.txt, line \d+: submission_division is '\.\./"):
        score(folder)
    assert not marker.exists()
    # What the refusal prevents: the checker itself, on that log, runs the planted code.
    checker = mlp_compliance.make_checker("training", "4.0.0", quiet=True, werror=False)
    checker.check_file(str(folder / "result_0.txt"), "training_4.0.0/common.yaml")
    mlp_compliance.enqueued_configs.clear()
    assert marker.exists()


def test_checker_error_is_refused_and_leaves_no_queued_rules(tmp_path):
    from mlperf_logging.compliance_checker import mlp_compliance

    folder = copy_runs(H200, tmp_path / "llama2_70b_lora")
    log = folder / "result_0.txt"
    text = log.read_text(encoding="latin-1")
    text = re.sub(r'("key": "eval_accuracy", "value": )[0-9.]+', r"\g<1>null", text, count=1)
    log.write_text(text, encoding="latin-1")
    # Closed llama2_70b_lora's rule compares eval_accuracy with 0.925: null stops the checker.
    with pytest.raises(ScoreError, match=r"result_0\.txt: .*compliance checker fails .*TypeError"):
        score(folder)
    assert mlp_compliance.enqueued_configs == []
    (row,) = score(H200)  # the next folder is checked with the right rules
    assert row.minutes == SUMMARIZER_MINUTES["h200_ngc24.04_nemo"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"scaling_factor": "1.5"}', "scaling_factor is '1.5'; it must be a finite positive"),
        ('{"scaling_factor": true}', "scaling_factor is True"),
        ('{"scaling_factor": -1.0}', "scaling_factor is -1.0"),
        ('{"scale": 1.1}', "scaling_factor is None"),
        ('{"scaling_factor": NaN}', "not valid JSON"),
        ("[1.1]", "holds a JSON array, expected a JSON object"),
    ],
)
def test_bad_scaling_json_is_refused_naming_it(tmp_path, content, message):
    folder = copy_runs(H200, tmp_path / "llama2_70b_lora")
    (folder / "scaling.json").write_text(content)
    with pytest.raises(ScoreError, match=re.escape(message)):
        score(folder)


def test_infinite_mean_is_refused(tmp_path):
    # One infinite run_stop is the slowest run and dropped, as the summarizer drops it
    # (tests/test_score_summarizer.py); two leave infinity in the mean.
    folder = copy_runs(H200, tmp_path / "llama2_70b_lora")
    for name in ("result_0.txt", "result_1.txt"):
        log = folder / name
        text = log.read_text(encoding="latin-1")
        text, n = re.subn(
            r'"time_ms": [0-9]+(, "event_type": "INTERVAL_END", "key": "run_stop")',
            r'"time_ms": Infinity\1',
            text,
        )
        assert n == 1
        log.write_text(text, encoding="latin-1")
    with pytest.raises(ScoreError, match=r"the olympic mean is inf minutes"):
        score(folder)


def test_score_leaves_logging_unconfigured(monkeypatch):
    # The checker logs through logging.warning(), which installs a stderr handler on a root
    # logger that has none.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    score(GPT3)
    assert root.handlers == []


def test_cli_score_prints_minutes(capsys):
    assert cli.main(["score", str(H200.parents[2])]) == 0
    out = capsys.readouterr().out
    assert "llama2_70b_lora" in out and "24.689" in out


def test_cli_score_bad_folder_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["score", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlperf-tutor: error: ") and err.count("\n") == 1


def test_cli_score_passes_the_ruleset(capsys):
    assert cli.main(["score", str(GPT3), "--ruleset", "5.0.0"]) == 2
    err = capsys.readouterr().err
    assert "'gpt3' is not a benchmark of MLPerf Training ruleset 5.0.0" in err

"""Time-to-train scoring against the official result_summarizer, on real MLPerf v4.0 logs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlperf_tutor import cli
from mlperf_tutor.mlperf import score
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
# never reaches the target (its eval_accuracy <= 0.925 set to 0.93, run_stop status "aborted"),
# so that the summarizer's compliance check also calls it non-converged:
#   python -m mlperf_logging.result_summarizer NVIDIA training 4.0.0 --csv out.csv
H200_RESULT_8_ABORTED = 25.085860416666666


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


def test_non_converged_run_is_slowest_and_matches_summarizer(tmp_path):
    folder = copy_runs(H200, tmp_path / "llama2_70b_lora")
    edit(folder / "result_8.txt", '"status": "success"', '"status": "aborted"')
    (row,) = score(folder)
    assert (row.runs, row.used, row.dropped, row.non_converged) == (10, 8, 1, 1)
    assert row.minutes == H200_RESULT_8_ABORTED


def test_unet3d_drops_four_and_four_with_non_converged_runs_at_the_slow_end(tmp_path):
    # No unet3d logs among the test data: 40 minimal logs taking 1..40 minutes, 1 and 40 aborted.
    folder = tmp_path / "unet3d"
    folder.mkdir()
    for i in range(40):
        status = "aborted" if i in (0, 39) else "success"
        records = [
            ("submission_benchmark", 0, "unet3d", {}),
            ("run_start", 0, None, {}),
            ("run_stop", (i + 1) * 60_000, None, {"status": status}),
        ]
        folder.joinpath(f"result_{i}.txt").write_text(
            "".join(
                f":::MLLOG {json.dumps(dict(time_ms=t, key=k, value=v, metadata=m))}\n"
                for k, t, v, m in records
            )
        )
    (row,) = score(folder)
    # Converged 2..39; drop 2..5 and, the two aborted runs filling the slow end, 38 and 39.
    assert (row.runs, row.used, row.dropped, row.non_converged) == (40, 32, 6, 2)
    assert row.minutes == sum(range(6, 38)) / 32


def test_too_many_non_converged_runs_is_an_error(tmp_path):
    folder = copy_runs(H200, tmp_path / "llama2_70b_lora")
    for name in ("result_0.txt", "result_1.txt"):
        edit(folder / name, '"status": "success"', '"status": "aborted"')
    with pytest.raises(ValueError, match=r"2 runs whose run_stop status is not 'success'.*most 1"):
        score(folder)


def test_too_few_runs_names_folder_and_count(tmp_path):
    copy_runs(GPT3, tmp_path / "gpt3", ["result_0.txt", "result_1.txt"])
    with pytest.raises(ValueError, match=r"gpt3 has 2 result_\*\.txt file\(s\) but gpt3 needs 3"):
        score(tmp_path)


def test_log_without_run_stop_is_an_error(tmp_path):
    folder = copy_runs(GPT3, tmp_path / "gpt3")
    log = folder / "result_1.txt"
    log.write_text("".join(line for line in log.open() if '"run_stop"' not in line))
    with pytest.raises(ValueError, match=r"result_1\.txt has no run_stop record"):
        score(folder)


def test_mixed_benchmarks_in_one_folder_are_refused(tmp_path):
    folder = copy_runs(GPT3, tmp_path / "gpt3")
    shutil.copy(H200 / "result_0.txt", folder / "result_3.txt")
    with pytest.raises(ValueError, match=r"mixes benchmarks.*gpt3: .*llama2_70b_lora: result_3"):
        score(folder)


def test_logs_disagreeing_with_folder_name_are_refused(tmp_path):
    copy_runs(GPT3, tmp_path / "bert")
    with pytest.raises(ValueError, match=r"holds gpt3 logs .* named 'bert'; rename the folder"):
        score(tmp_path)


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"holds no result_\*\.txt logs"):
        score(tmp_path)
    with pytest.raises(ValueError, match=r"is not a folder"):
        score(tmp_path / "missing")


def test_cli_score_prints_minutes(capsys):
    assert cli.main(["score", str(H200.parents[2])]) == 0
    out = capsys.readouterr().out
    assert "llama2_70b_lora" in out and "24.689" in out


def test_cli_score_bad_folder_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["score", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlperf-tutor: error: ") and err.count("\n") == 1

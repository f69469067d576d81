"""The shipped MLPerf Training v4.0 results summary: shape, columns and the fastest-row helper."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlperf_tutor.mlperf import results

REPO = Path(__file__).resolve().parents[1]
SHARED_CSV = REPO.parent / "shared" / "data" / "mlperf_training_v4.0" / "summary.csv"
SHIPPED_CSV = REPO / "mlperf_tutor" / "mlperf" / "data" / "summary_v4.0.csv"

COLUMNS = [
    "division", "availability", "submitter", "system", "number_of_nodes",
    "host_processor_model_name", "host_processors_count", "accelerator_model_name",
    "accelerators_count", "framework", "notes", *results.BENCHMARKS, "details_url", "code_url",
]  # fmt: skip


def test_summary_has_97_rows_and_the_csv_columns():
    df = results.load_summary()
    assert len(df) == 97
    assert list(df.columns) == COLUMNS


def test_benchmark_columns_are_minutes():
    df = results.load_summary()
    for b in results.BENCHMARKS:
        times = df[b].dropna()
        assert len(times) > 0, b
        assert (times > 0).all(), b


@pytest.mark.parametrize("benchmark", results.BENCHMARKS)
def test_fastest_agrees_with_pandas_min(benchmark):
    df = results.load_summary()
    row = results.fastest(benchmark)
    assert row[benchmark] == df.loc[df["division"] == "closed", benchmark].min()
    assert row["division"] == "closed"


def test_fastest_bert_is_eos_n434():
    row = results.fastest("bert")
    assert (row["submitter"], row["system"]) == ("NVIDIA", "Eos_n434")
    assert row["accelerators_count"] == 3472


def test_fastest_rejects_unknown_benchmark_and_empty_division():
    with pytest.raises(ValueError, match="unknown benchmark 'maskrcnn'"):
        results.fastest("maskrcnn")
    with pytest.raises(ValueError, match="no 'open' division result"):
        results.fastest("bert", division="open")


def test_import_does_not_import_pandas():
    code = "import mlperf_tutor.mlperf.results, sys; assert 'pandas' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not SHARED_CSV.exists(), reason="../shared summary not present")
def test_shipped_copy_matches_shared_data():
    assert SHIPPED_CSV.read_bytes() == SHARED_CSV.read_bytes()

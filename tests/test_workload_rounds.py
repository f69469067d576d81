"""Each workload's rounds agree with the official summaries' benchmark columns (copied from
../shared/data/mlperf_training_v*/summary.csv headers into tests/data/summary_columns.csv)."""

import csv
from pathlib import Path

import pytest

from mlperf_tutor import workloads

COLUMNS = Path(__file__).parent / "data" / "summary_columns.csv"


def _columns() -> dict[str, set[str]]:
    with COLUMNS.open() as f:
        return {row[0]: set(row[1:]) for row in csv.reader(f)}


@pytest.mark.parametrize("name", [n for n in workloads.names() if n != "toy"])
def test_rounds_match_the_summaries(name):
    wl = workloads.get(name)
    ran = tuple(r for r, benchmarks in _columns().items() if wl.name in benchmarks)
    assert wl.rounds == ran
    assert (wl.suite == "training") == bool(ran)

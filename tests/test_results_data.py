"""The shipped MLPerf Training v4.0 results summary: shape, columns and the fastest-row helper."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from mlperf_tutor.mlperf import results

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CSV = REPO / "mlperf_tutor" / "mlperf" / "data" / "summary_v4.0.csv"
# sha256 of the official summarizer's output over the whole v4.0 results repository, the file
# the package ships a copy of (checked against the original when it was copied).
OFFICIAL_SUMMARY_SHA256 = "99899265ad9054d1997112b2c59cf91ef55a35214f3c83b47a12a93b9488ad7e"

COLUMNS = [
    "division",
    "availability",
    "submitter",
    "system",
    "number_of_nodes",
    "host_processor_model_name",
    "host_processors_count",
    "accelerator_model_name",
    "accelerators_count",
    "framework",
    "notes",
    *results.BENCHMARKS,
    "details_url",
    "code_url",
]


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


def test_shipped_copy_is_the_official_summary_byte_for_byte():
    assert hashlib.sha256(SHIPPED_CSV.read_bytes()).hexdigest() == OFFICIAL_SUMMARY_SHA256


# --- the long form ---------------------------------------------------------------------------

LONG_COLUMNS = [
    "division",
    "availability",
    "submitter",
    "system",
    "nodes",
    "host_processor",
    "host_processors",
    "accelerator",
    "accelerators",
    "benchmark",
    "minutes",
    "framework",
    "framework_text",
    "summary_row",
]


def test_long_form_has_one_row_per_nonempty_cell():
    import pandas as pd

    wide = pd.read_csv(SHIPPED_CSV)
    cells = wide[list(results.BENCHMARKS)].stack().dropna()  # (row, benchmark) -> minutes
    assert int(wide[list(results.BENCHMARKS)].notna().sum().sum()) == len(cells)
    long = results.load_long()
    assert list(long.columns) == LONG_COLUMNS
    assert len(long) == len(cells) == 202
    assert set(zip(long["summary_row"], long["benchmark"], strict=True)) == set(cells.index)


def test_long_form_minutes_equal_the_csv_cells():
    import pandas as pd

    wide = pd.read_csv(SHIPPED_CSV)
    long = results.load_long()
    for row in long.itertuples():
        assert row.minutes == wide.at[row.summary_row, row.benchmark]
        assert row.system == wide.at[row.summary_row, "system"]
        assert row.accelerators == wide.at[row.summary_row, "accelerators_count"]
        assert row.framework_text == wide.at[row.summary_row, "framework"]


def test_long_form_counts_are_ints_and_accelerators_normalised():
    long = results.load_long()
    for col in ("accelerators", "host_processors", "nodes"):
        assert long[col].dtype.kind == "i", col
    raw = set(results.load_summary()["accelerator_model_name"])
    assert raw <= set(results.ACCELERATORS), raw - set(results.ACCELERATORS)
    assert set(long["accelerator"]) <= set(results.ACCELERATORS.values())
    assert "H100-SXM-80GB" not in set(long["accelerator"])  # folded into H100-SXM5-80GB


def test_every_framework_label_is_documented_and_none_is_other():
    long = results.load_long()
    labels = set(long["framework"])
    assert labels <= set(results.FRAMEWORKS), labels - set(results.FRAMEWORKS)
    assert not long["framework"].str.startswith("other").any()
    assert labels == set(results.FRAMEWORKS)  # every documented label is used


def test_nvidia_rows_name_the_framework_of_nvidia_implementation():
    """NVIDIA's own rows each name one framework; it must be the table's entry per benchmark."""
    names = {
        "pytorch": "PyTorch",
        "mxnet": "MXNet",
        "hugectr": "HugeCTR",
        "dgl": "DGL",
        "nemo": "NeMo/Megatron",
    }
    long = results.load_long()
    nvidia = long[long["submitter"].str.startswith("NVIDIA")]
    assert set(nvidia["benchmark"]) == set(results.BENCHMARKS)
    for row in nvidia.itertuples():
        named = {label for word, label in names.items() if word in row.framework_text.lower()}
        assert named == {results.NVIDIA_IMPLEMENTATION[row.benchmark]}, row


@pytest.mark.parametrize(
    "text, benchmark, accelerator, label",
    [
        # the text lists PyTorch only, but ResNet is NVIDIA's MXNet implementation
        ("PyTorch NVIDIA Release 24.04", "resnet", "NVIDIA H100-SXM5-80GB", "MXNet"),
        ("NVIDIA PyTorch/MxNeti/DGL", "dlrm_dcnv2", "NVIDIA H100-SXM5-80GB", "HugeCTR"),
        ("CUDA 12.3", "llama2_70b_lora", "NVIDIA H100-SXM-80GB", "NeMo/Megatron"),
        ("NGC MLPerf v4.0", "unet3d", "NVIDIA H100-SXM5-80GB", "MXNet"),
        ("PyTorch 2.1.1", "gpt3", "Intel(R) Gaudi(R) 2 AI Accelerator", "PyTorch"),
        ("maxtext", "gpt3", "TPU-v5p", "JAX/MaxText"),
        (
            "NGC PyTorch Release 24.01 Deepspeed N8",
            "llama2_70b_lora",
            "NVIDIA A100-SXM4-80GB",
            "DeepSpeed",
        ),
        ("tinygrad, commit b399d98", "resnet", "NVIDIA GeForce RTX 4090", "tinygrad"),
    ],
)
def test_framework_label_rules(text, benchmark, accelerator, label):
    assert results.framework_label(text, benchmark, accelerator) == label


def test_framework_label_keeps_unknown_text_visible():
    assert results.framework_label("TensorFlow 2.15", "bert", "TPU-v4") == "other: TensorFlow 2.15"
    assert results.framework_label("Flux.jl", "resnet", "NVIDIA L40S") == "other: Flux.jl"

"""The official MLPerf Training v4.0 results summary, shipped as package data.

``data/summary_v4.0.csv`` is the output of ``mlperf_logging.result_summarizer`` over
https://github.com/mlcommons/training_results_v4.0: one row per submitted system and benchmark,
benchmark columns in minutes (olympic mean of the runs, times any ``scaling.json`` factor).

:func:`load_summary` returns the CSV as it is (wide, one row per system description);
:func:`load_long` returns one row per result with the accelerator and the framework normalised.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

#: Benchmark columns of the summary, in file order. Values are minutes; NaN where not submitted.
BENCHMARKS = (
    "bert",
    "dlrm_dcnv2",
    "gpt3",
    "resnet",
    "ssd",
    "unet3d",
    "stable_diffusion",
    "llama2_70b_lora",
    "gnn",
)

_SUMMARY = "summary_v4.0.csv"

#: The framework labels of :func:`load_long`. The rules that assign them are in
#: :func:`framework_label`; text that no rule recognises becomes ``"other: <text>"``. No v4.0 row
#: names TensorFlow (or JAX other than through MaxText), so neither has a label of its own.
FRAMEWORKS = (
    "PyTorch",
    "NeMo/Megatron",
    "DeepSpeed",
    "MXNet",
    "HugeCTR",
    "DGL",
    "JAX/MaxText",
    "tinygrad",
)

#: The framework of NVIDIA's own v4.0 implementation of each benchmark: the folders
#: ``NVIDIA/benchmarks/<benchmark>/implementations/*_{pytorch,mxnet,merlin_hugectr,dgl,nemo}`` of
#: the results repository, and the one framework named by each NVIDIA row of the summary (checked
#: in tests/test_results_data.py). UNet3D is MXNet, not PyTorch: NVIDIA's unet3d rows are its
#: "MxNet NVIDIA Release" systems.
NVIDIA_IMPLEMENTATION = {
    "bert": "PyTorch",
    "ssd": "PyTorch",
    "resnet": "MXNet",
    "unet3d": "MXNet",
    "dlrm_dcnv2": "HugeCTR",
    "gnn": "DGL",
    "gpt3": "NeMo/Megatron",
    "llama2_70b_lora": "NeMo/Megatron",
    "stable_diffusion": "NeMo/Megatron",
}

#: ``accelerator_model_name`` as submitted -> one name per part. Unlisted names pass through.
ACCELERATORS = {
    "NVIDIA H100-SXM5-80GB": "H100-SXM5-80GB",
    "NVIDIA H100-SXM-80GB": "H100-SXM5-80GB",  # Supermicro's spelling; HBM3, NVLink: the SXM5 part
    "NVIDIA H100-PCIe-80GB": "H100-PCIe-80GB",
    "NVIDIA H200-SXM5-141GB": "H200-SXM5-141GB",
    "NVIDIA A100-SXM4-80GB": "A100-SXM4-80GB",
    "NVIDIA L40S": "L40S",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "AMD Radeon RX 7900 XTX": "RX 7900 XTX",
    "TPU-v5p": "TPU v5p",
    "Intel(R) Gaudi(R) 2 AI Accelerator": "Gaudi2",
}

# Words by which the free text points at NVIDIA's software: its NGC containers ("NGC", "NVIDIA
# Release 24.04", "CUDA 12.3") or the frameworks of its implementations ("MxNeti" is a typo in a
# submitted row).
_NVIDIA_STACK = re.compile(r"ngc|nvidia|cuda|mxnet|pytorch|dgl|hugectr|nemo", re.IGNORECASE)


def load_summary() -> pd.DataFrame:
    """Load the MLPerf Training v4.0 results summary.

    Returns:
        A DataFrame with one row per submitted system, columns exactly as in the CSV (``division``,
        ``availability``, ``submitter``, ``system``, ``number_of_nodes``, ...,
        ``accelerators_count``, ``framework``, ``notes``, the :data:`BENCHMARKS` columns in
        minutes, ``details_url``, ``code_url``).
    """
    import pandas as pd

    with resources.files(__package__).joinpath("data", _SUMMARY).open("rb") as f:
        return pd.read_csv(f)


def framework_label(text: str, benchmark: str, accelerator_model_name: str) -> str:
    """Normalise the free-text ``framework`` of a summary row, for one of its benchmarks.

    The text describes the software of a whole system description, which often covers several
    benchmarks, so the label depends on the benchmark too. Rules, first match wins:

    1. ``tinygrad`` -> ``"tinygrad"`` (tinycorp: "tinygrad, commit ...").
    2. ``maxtext`` -> ``"JAX/MaxText"`` (Google's TPU v5p rows: "maxtext").
    3. ``deepspeed`` -> ``"DeepSpeed"`` (JuniperNetworks: "NGC PyTorch Release 24.01 Deepspeed N8";
       PyTorch with DeepSpeed, not NVIDIA's implementation).
    4. An NVIDIA accelerator and text naming NVIDIA's software (NGC, "NVIDIA Release", "CUDA",
       MXNet, PyTorch, DGL, HugeCTR, NeMo) -> :data:`NVIDIA_IMPLEMENTATION` ``[benchmark]``. These
       submitters run NVIDIA's implementation of each benchmark, whatever subset of containers
       their text lists: Sustainable Metal Cloud's "PyTorch NVIDIA Release 24.04" covers its
       ResNet, which is NVIDIA's MXNet code (``smc/benchmarks/resnet/implementations/mxnet``);
       Supermicro's "CUDA 12.3" covers MXNet, PyTorch and NeMo code; "NGC MLPerf v4.0" (Lenovo)
       names no framework at all; GigaComputing's "PyTorch" row holds NeMo's Llama 2 and Stable
       Diffusion. Each case was checked against the submitter's implementation folders in the
       results repository.
    5. ``pytorch`` on any other accelerator -> ``"PyTorch"`` (Intel-HabanaLabs on Gaudi2:
       "PyTorch 2.1.1", "PyTorch 2.2.0").
    6. Anything else -> ``"other: <text>"``, so that unknown text stays visible.

    Args:
        text: the row's ``framework`` cell.
        benchmark: one of :data:`BENCHMARKS`.
        accelerator_model_name: the row's ``accelerator_model_name`` cell.

    Returns:
        One of :data:`FRAMEWORKS`, or ``"other: <text>"``.
    """
    low = text.lower()
    if "tinygrad" in low:
        return "tinygrad"
    if "maxtext" in low:
        return "JAX/MaxText"
    if "deepspeed" in low:
        return "DeepSpeed"
    if accelerator_model_name.startswith("NVIDIA") and _NVIDIA_STACK.search(text):
        return NVIDIA_IMPLEMENTATION[benchmark]
    if "pytorch" in low:
        return "PyTorch"
    return f"other: {text}"


def load_long() -> pd.DataFrame:
    """The summary in long form: one row per system description and benchmark with a time.

    Returns:
        A DataFrame with columns ``division``, ``availability``, ``submitter``, ``system``,
        ``nodes``, ``host_processor`` (model name), ``host_processors`` (count),
        ``accelerator`` (normalised by :data:`ACCELERATORS`), ``accelerators`` (count),
        ``benchmark``, ``minutes``, ``framework`` (see :func:`framework_label`),
        ``framework_text`` (the cell as submitted) and ``summary_row`` (the row's index in
        :func:`load_summary`). Rows are in summary order, benchmarks in :data:`BENCHMARKS` order.
    """
    wide = load_summary().reset_index(names="summary_row")
    ids = {
        "division": "division",
        "availability": "availability",
        "submitter": "submitter",
        "system": "system",
        "number_of_nodes": "nodes",
        "host_processor_model_name": "host_processor",
        "host_processors_count": "host_processors",
        "accelerator_model_name": "accelerator_model_name",
        "accelerators_count": "accelerators",
        "framework": "framework_text",
        "summary_row": "summary_row",
    }
    long = (
        wide.rename(columns=ids)
        .melt(
            id_vars=list(ids.values()),
            value_vars=list(BENCHMARKS),
            var_name="benchmark",
            value_name="minutes",
        )
        .dropna(subset=["minutes"])
        .sort_values("summary_row", kind="stable")  # melt stacks benchmark by benchmark
        .reset_index(drop=True)
    )
    long["framework"] = [
        framework_label(t, b, a)
        for t, b, a in zip(
            long["framework_text"], long["benchmark"], long["accelerator_model_name"], strict=True
        )
    ]
    long["accelerator"] = long["accelerator_model_name"].map(lambda a: ACCELERATORS.get(a, a))
    columns = [
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
    return long[columns]


def fastest(benchmark: str, division: str = "closed") -> pd.Series:
    """The summary row with the lowest time for ``benchmark`` in ``division``.

    Args:
        benchmark: one of :data:`BENCHMARKS`.
        division: ``"closed"`` or ``"open"``.

    Returns:
        The row as a Series; ``row[benchmark]`` is the time in minutes.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}"
        )
    df = load_summary()
    times = df.loc[df["division"] == division, benchmark].dropna()
    if times.empty:
        divisions = sorted(df["division"].unique())
        raise ValueError(
            f"no {division!r} division result for {benchmark!r} in the v4.0 summary "
            f"(divisions present: {', '.join(divisions)})"
        )
    return df.loc[times.idxmin()]

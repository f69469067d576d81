"""The official MLPerf Training v4.0 results summary, shipped as package data.

``data/summary_v4.0.csv`` is the output of ``mlperf_logging.result_summarizer`` over
https://github.com/mlcommons/training_results_v4.0: one row per submitted system and benchmark,
benchmark columns in minutes (olympic mean of the runs, times any ``scaling.json`` factor).
"""

from __future__ import annotations

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

"""MLPerf harness: time-to-train scoring and the v4.0 results data.

``mlperf_tutor.mlperf.score`` (module ``scoring``) scores a folder of MLPerf result logs exactly as
``mlperf_logging.result_summarizer`` does (standard library only). ``mlperf_tutor.mlperf.results``
loads the official MLPerf Training v4.0 results summary that ships with the package (pandas is
imported only when it is loaded).
"""

from mlperf_tutor.mlperf.scoring import BenchmarkScore, Scores, score

__all__ = ["BenchmarkScore", "Scores", "score"]

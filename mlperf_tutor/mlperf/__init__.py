"""MLPerf harness: time-to-train scoring and the v4.0 results data.

``mlperf_tutor.mlperf.score`` (module ``scoring``) scores a folder of MLPerf result logs exactly as
``mlperf_logging.result_summarizer`` does, for the rulesets in ``scoring.RULESETS`` (it runs
mlperf-logging's compliance checker on each log, imported only when a folder is scored).
``mlperf_tutor.mlperf.results`` loads the official MLPerf Training v4.0 results summary that ships
with the package (pandas is imported only when it is loaded).
"""

from mlperf_tutor.mlperf.scoring import BenchmarkScore, ScoreError, Scores, score

__all__ = ["BenchmarkScore", "ScoreError", "Scores", "score"]

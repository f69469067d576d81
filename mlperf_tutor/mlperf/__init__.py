"""MLPerf harness: mllog emission, time-to-train scoring, and the v4.0 results data.

``mlperf_tutor.mlperf.results`` loads the official MLPerf Training v4.0 results summary that ships
with the package (pandas is imported only when it is loaded).
"""

"""mlperf_tutor: MLPerf Training workloads in PyTorch, JAX and TensorFlow, with parity tools.

Importing this package imports no deep-learning framework; each framework is imported only when
its adapter or model module is used (``mlperf_tutor.frameworks.get("jax")`` and friends).
"""

from mlperf_tutor import core, workloads

__version__ = "0.1.0"
FRAMEWORKS = ("torch", "jax", "tf")

__all__ = ["FRAMEWORKS", "__version__", "core", "workloads"]

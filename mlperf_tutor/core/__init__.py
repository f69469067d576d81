"""Framework-neutral machinery (numpy only): configs, canonical checkpoints, tree utilities,
parity reports, optimizer/schedule specs and their numpy reference implementations, atomic file
writes (``core.io``) and what checkpoint formats need from a workload (``core.interop``)."""

from mlperf_tutor.core.checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    Tree,
    check_tree,
    tree_specs,
)
from mlperf_tutor.core.config import Config, ConfigError
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec, state_key
from mlperf_tutor.core.parity import Comparison, ParityReport, errors
from mlperf_tutor.core.reference import ReferenceOptimizer, clip_by_global_norm, global_norm

__all__ = [
    "CheckpointError",
    "CheckpointMismatch",
    "Comparison",
    "Config",
    "ConfigError",
    "OptimizerSpec",
    "ParityReport",
    "ReferenceOptimizer",
    "ScheduleSpec",
    "Tree",
    "check_tree",
    "clip_by_global_norm",
    "errors",
    "global_norm",
    "state_key",
    "tree_specs",
]

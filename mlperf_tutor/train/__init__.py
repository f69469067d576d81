"""The one training path: ``mlperf_tutor.train.train`` and ``mlperf-tutor train``.

:mod:`~mlperf_tutor.train.loop` runs a workload in a framework on a device, in float32 or bf16
mixed precision, from synthetic batches or the workload's real data files, as MLPerf runs it;
:mod:`~mlperf_tutor.train.checkpoints` saves and resumes runs; :mod:`~mlperf_tutor.train.progress`
measures throughput and MFU and writes loss curves; :mod:`~mlperf_tutor.train.presets` picks the
size that fits the device.
"""

from mlperf_tutor.train.loop import DEVICES, PRECISIONS, TrainResult, dry_run, train
from mlperf_tutor.train.presets import accelerator, device_preset
from mlperf_tutor.train.progress import write_curve

__all__ = [
    "DEVICES",
    "PRECISIONS",
    "TrainResult",
    "accelerator",
    "device_preset",
    "dry_run",
    "train",
    "write_curve",
]

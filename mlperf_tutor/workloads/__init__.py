"""The workload registry: ``names()`` and ``get(name)``.

Workloads register here by module path; nothing of a workload (and no framework) is imported
until it is asked for.
"""

from __future__ import annotations

import importlib

from mlperf_tutor.workloads.base import Workload

# name -> "module:attribute" of the Workload instance.
_REGISTRY = {
    "bert": "mlperf_tutor.workloads.bert:WORKLOAD",
    "dlrm_dcnv2": "mlperf_tutor.workloads.dlrm:WORKLOAD",
    "gpt3": "mlperf_tutor.workloads.gpt:GPT3",
    "gptj": "mlperf_tutor.workloads.gpt:GPTJ",
    "llama2_70b_lora": "mlperf_tutor.workloads.llama:WORKLOAD",
    "stable_diffusion": "mlperf_tutor.workloads.stable_diffusion:WORKLOAD",
    "toy": "mlperf_tutor.workloads.toy:WORKLOAD",
}


def names() -> list[str]:
    """Names of every registered workload, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Workload:
    """The workload called ``name``; an unknown name raises a ValueError listing the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown workload {name!r}; choose one of {names()}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["Workload", "get", "names"]

"""Sizes that follow the device: ``tiny`` on a CPU, the workload's ``small`` on a GPU or TPU.

The chapters and ``preset="auto"`` use :func:`device_preset`, so a reader on a Colab GPU or TPU
trains the real ``small`` models through the training path, and a CPU-only reader (and the
tests) the ``tiny`` ones.
"""

from __future__ import annotations

import os

from mlperf_tutor import frameworks, workloads

# Overrides the choice, e.g. MLPERF_TUTOR_PRESET=tiny on a small GPU.
PRESET_VARIABLE = "MLPERF_TUTOR_PRESET"


def accelerator() -> str | None:
    """ "gpu" or "tpu" if any installed framework sees one, else None.

    Asks torch first, then JAX, then TensorFlow, and stops at the first accelerator, so a GPU
    machine does not import TensorFlow only to be asked."""
    for name in frameworks.installed():
        adapter = frameworks.get(name)
        for device in adapter.devices():
            lowered = device.lower()
            if "tpu" in lowered:
                return "tpu"
            if "cuda" in lowered or "gpu" in lowered or "rocm" in lowered:
                return "gpu"
    return None


def device_preset(workload: str) -> str:
    """The preset a chapter should run ``workload`` at on this machine.

    ``MLPERF_TUTOR_PRESET`` wins when set; otherwise ``small`` where an accelerator is present
    and the workload has that preset (``gptj`` has only ``tiny`` and ``full``), else ``tiny``.
    """
    wl = workloads.get(workload)
    presets = sorted(wl.config_class.PRESETS)
    chosen = os.environ.get(PRESET_VARIABLE)
    if chosen:
        if chosen not in presets:
            raise ValueError(
                f"{PRESET_VARIABLE}={chosen!r} is not a preset of {wl.name}; "
                f"choose one of {presets}"
            )
        return chosen
    if accelerator() is not None and "small" in presets:
        return "small"
    return "tiny"

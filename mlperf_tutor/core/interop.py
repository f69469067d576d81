"""What checkpoint formats need from a workload: the seam between ``convert`` and ``workloads``.

``mlperf_tutor.convert`` reads and writes checkpoint files knowing no workload and no framework.
Two formats hold more than names and arrays, and ask the workload through these types only:

- a Keras ``.weights.h5`` file stores variables by layer path, so only the workload's TF model
  can read or write it (:meth:`CheckpointOwner.read_keras_weights`, ``write_keras_weights``);
- a Hugging Face ``save_pretrained`` directory uses the library's tensor names and config.json,
  which the workload's :class:`HfInterop` maps to and from canonical names and its config.

``Workload`` (``mlperf_tutor.workloads.base``) implements :class:`CheckpointOwner`; each workload
with a public naming builds its :class:`HfInterop` in its ``hf.py``. Both sides import this
module, which imports neither.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from mlperf_tutor.core.checkpoint import Tree
from mlperf_tutor.core.config import Config


@dataclasses.dataclass(frozen=True)
class HfInterop:
    """A workload's Hugging Face naming: its config and ``save_pretrained`` directories.

    Every function works on files and numpy arrays; none imports transformers or diffusers.

    Attributes:
        architecture: the config fields a checkpoint fixes (layer count, widths, heads, eps:
            fields that change the model but not always the tensor shapes); reading a
            directory with a config that differs in one of them is refused.
        config_from_hf: ``(hf_config, preset=..., **overrides) -> Config``: the architecture
            from a transformers config (object, dict, config.json path or directory), the rest
            from a preset.
        config_to_hf: ``(cfg) -> dict``: the config.json of ``cfg``.
        load_pretrained: ``(directory) -> (cfg, tree)``: the config of the directory's
            config.json (default preset for the rest) and the canonical tree (memory-mapped).
        save_pretrained: ``(tree, cfg, directory) -> None``: write a canonical tree as a
            directory the library loads with no missing or unexpected key (atomically).
    """

    architecture: tuple[str, ...]
    config_from_hf: Callable[..., Config]
    config_to_hf: Callable[[Config], dict[str, Any]]
    load_pretrained: Callable[[str | os.PathLike], tuple[Config, Tree]]
    save_pretrained: Callable[[Mapping[str, np.ndarray], Config, str | os.PathLike], None]


class CheckpointOwner(Protocol):
    """What ``mlperf_tutor.convert`` needs from a workload to read and write its checkpoints.

    Attributes:
        name: the workload's name, for messages.
        hf: its Hugging Face naming, or None (no ``save_pretrained`` directories).
    """

    name: str
    hf: HfInterop | None

    def canonical_specs(self, cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
        """Canonical name -> (shape, dtype name) of every weight of ``cfg``'s model."""
        ...

    def read_keras_weights(self, path: str | os.PathLike, cfg: Config) -> Tree:
        """The canonical tree in a ``.weights.h5`` file of ``cfg``'s TF model.

        ``path`` is an existing HDF5 file; any error of Keras or h5py propagates (convert
        reports it naming the file).
        """
        ...

    def write_keras_weights(
        self, tree: Mapping[str, np.ndarray], path: str | os.PathLike, cfg: Config
    ) -> None:
        """Write ``tree`` to ``path`` as ``cfg``'s TF model's ``.weights.h5`` file (``path`` is
        a temporary that convert then moves into place)."""
        ...

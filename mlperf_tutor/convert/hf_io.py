"""Hugging Face ``save_pretrained`` directories, read and written without transformers.

Layout (what ``PreTrainedModel.save_pretrained`` writes with transformers 5): ``config.json``
and either one ``model.safetensors`` or shards ``model-00001-of-0000N.safetensors`` listed by
``model.safetensors.index.json`` (``{"metadata": {...}, "weight_map": {name: shard file}}``).
diffusers' ``ModelMixin.save_pretrained`` writes the same with the stem
``diffusion_pytorch_model`` instead of ``model``.
Tensors carry the library's own names (e.g. ``bert.encoder.layer.0.attention.self.query.weight``)
in PyTorch layouts.

This module handles the files; the naming and the config belong to the workload, whose
:class:`~mlperf_tutor.core.interop.HfInterop` (``workload.hf``) maps them to and from canonical
names and its config, reading and writing the files with the functions here (which ``convert``
exports as ``read_hf_config``, ``read_hf_weights``, ``write_hf_directory``, ...).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlperf_tutor.convert.safetensors_io import SafetensorsReader, write_safetensors
from mlperf_tutor.convert.tensors import TensorSpec
from mlperf_tutor.core.checkpoint import CheckpointError, Tree
from mlperf_tutor.core.config import Config, ConfigError
from mlperf_tutor.core.files import read_json, regular_file
from mlperf_tutor.core.interop import CheckpointOwner, HfInterop
from mlperf_tutor.core.io import atomic_dir

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name for the same file
_WEIGHT_FILES = (WEIGHTS, DIFFUSERS_WEIGHTS)
# Files that make an existing directory a ``save_pretrained`` one. The weight files count too, so
# that a directory whose config.json went missing is reported as such rather than as a broken
# Orbax checkpoint.
MARKERS = (CONFIG, WEIGHTS, INDEX, DIFFUSERS_WEIGHTS, f"{DIFFUSERS_WEIGHTS}.index.json")

# What a save_pretrained of a model writes; a directory holding only these may be replaced.
_MODEL_FILES = re.compile(
    r"config\.json|generation_config\.json"
    r"|(model|diffusion_pytorch_model)(\.safetensors(\.index\.json)?|-\d+-of-\d+\.safetensors)"
)


def detect(path: str, name: str) -> bool:
    """Whether ``path`` is a ``save_pretrained`` directory: one holding any of :data:`MARKERS`,
    or any path named ``*.hf`` (how a new one is named)."""
    if name.endswith(".hf"):
        return True
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in MARKERS)


def require_hf(
    path: str | os.PathLike,
    owner: CheckpointOwner | None,
    cfg: Config | None = None,
    need_cfg: bool = False,
) -> HfInterop:
    """The Hugging Face interop of ``owner``, or a CheckpointError saying what is missing."""
    if owner is None:
        raise CheckpointError(
            f"{path} is a Hugging Face directory, whose tensor names only the workload knows; "
            "pass workload= (CLI: mlperf-tutor convert WORKLOAD ...)"
        )
    if owner.hf is None:
        raise CheckpointError(
            f"{path} is a Hugging Face directory, but workload {owner.name!r} has no Hugging "
            "Face interop; use .safetensors, .pt, .weights.h5 or an Orbax directory"
        )
    if need_cfg and cfg is None:
        raise CheckpointError(
            f"writing {path} needs the config for its config.json; pass cfg= (CLI: --preset PRESET)"
        )
    return owner.hf


def load_hf(path: str | os.PathLike, owner: CheckpointOwner | None, cfg: Config | None) -> Tree:
    """The canonical tree of a ``save_pretrained`` directory (memory-mapped), through the
    owner's naming; with ``cfg``, refused unless its architecture is the directory's."""
    hf = require_hf(path, owner)
    found, tree = hf.load_pretrained(path)
    if cfg is not None:
        check_architecture(hf, found, cfg, path)
    return tree


def save_hf(
    tree: Tree, path: str | os.PathLike, owner: CheckpointOwner | None, cfg: Config | None
) -> None:
    """Write ``tree`` as a ``save_pretrained`` directory of ``cfg``, through the owner's naming."""
    require_hf(path, owner, cfg, need_cfg=True).save_pretrained(tree, cfg, path)


def read_config(directory: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a ``save_pretrained`` directory.

    Raises:
        CheckpointError: no such directory, no config.json, or one that is not a regular file
            holding a JSON object (see :func:`mlperf_tutor.core.files.read_json`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} does not exist or is not a directory; check the path")
    path = directory / CONFIG
    if not path.exists():
        raise CheckpointError(
            f"{directory} has no {CONFIG}; a Hugging Face save_pretrained directory holds "
            f"{CONFIG} and {WEIGHTS} (save the model with save_pretrained)"
        )
    return read_json(path, CheckpointError, "Hugging Face config")


def config_dict(hf_config: Any) -> tuple[dict, str, type[Exception]]:
    """(config dict, how to name it in messages, the error class for its bad values) of any
    form ``config_from_hf`` accepts: a file's values are refused with a ``CheckpointError``
    naming the file, a config in memory with a ``ConfigError``.

    Raises:
        CheckpointError: a path that is not a readable JSON object (or its directory).
        ConfigError: an object that is no form of a config.
    """
    if isinstance(hf_config, (str, os.PathLike)):
        path = Path(hf_config)
        if path.is_dir():
            return read_config(path), str(path / CONFIG), CheckpointError
        config = read_json(path, CheckpointError, "Hugging Face config (config.json)")
        return config, str(path), CheckpointError
    if isinstance(hf_config, Mapping):
        return dict(hf_config), "the Hugging Face config", ConfigError
    if hasattr(hf_config, "to_dict"):  # a transformers PretrainedConfig
        return hf_config.to_dict(), f"the {type(hf_config).__name__}", ConfigError
    raise ConfigError(
        f"cannot read a Hugging Face config from a {type(hf_config).__name__}; pass a "
        "transformers config, its dict, a config.json path or a save_pretrained directory"
    )


def check_declared_size(directory: str | os.PathLike, shapes: Mapping, declared: str) -> None:
    """Refuse a config.json whose model is larger than the weight files beside it can hold,
    before anything of that size is built.

    Every stored dtype takes at least one byte per element, so the weights of ``shapes`` need at
    least as many bytes as they have elements; the weight files' sizes are summed from the
    directory (the index's shards, or the single file), nothing is read.

    Args:
        directory: the ``save_pretrained`` directory.
        shapes: tensor name -> shape that its config.json implies.
        declared: the config.json's sizes, for the message ("num_hidden_layers=2, ...").

    Raises:
        CheckpointError: the weights cannot be that large (the message names the sizes).
    """
    directory = Path(directory)
    files = []
    for stem in _WEIGHT_FILES:
        index = directory / f"{stem}.index.json"
        if index.exists():
            files = [directory / f for f in dict.fromkeys(_index(index).values())]
            break
        if (directory / stem).exists():
            files = [directory / stem]
            break
    if not files:
        return  # read_weights says what is missing
    stored = sum(regular_file(f, CheckpointError, "weights file").stat().st_size for f in files)
    elements = sum(math.prod(shape) for shape in shapes.values())
    if elements > stored:
        raise CheckpointError(
            f"{directory / CONFIG} declares a model of {elements:,} parameters ({declared}), but "
            f"the weight files of {directory} hold {stored:,} bytes, too few for them at any "
            "dtype; the config does not describe these weights (nothing was loaded)"
        )


def _index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name -> shard file name."""
    index = read_json(path, CheckpointError, "safetensors index", within=path.parent)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{path}: field weight_map is missing or not an object (tensor name -> shard file); "
            "re-save the model"
        )
    # Shard names are plain file names; anything else could point outside the directory.
    bad = [k for k, v in weight_map.items() if not (isinstance(v, str) and v == Path(v).name)]
    if bad:
        raise CheckpointError(
            f"{path}: field weight_map maps {bad[:5]} to something other than a file name in "
            "the directory; re-save the model"
        )
    return weight_map


def read_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a ``save_pretrained`` directory under its library name, memory-mapped.

    Nothing is read until a tensor is used (copy-on-write views, as ``convert.load`` gives).
    Only regular files inside ``directory`` are opened (a symlink leaving it is refused).

    Raises:
        CheckpointError: no weights, a corrupt file, an index that is not a JSON object with a
            ``weight_map`` of shard file names, a shard that is not a regular file of the
            directory, or an index naming a tensor that its shard does not hold.
    """
    directory = Path(directory)
    # lexists: an index that is a FIFO or a dangling symlink is refused by name, not skipped.
    weights = next(
        (w for w in _WEIGHT_FILES if os.path.lexists(directory / f"{w}.index.json")), None
    )
    if weights is None:
        single = next((w for w in _WEIGHT_FILES if os.path.lexists(directory / w)), None)
        if single is None:
            legacy = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
            hint = (
                f"; it holds {legacy[0]} (the pre-safetensors format): load it with "
                "transformers and save_pretrained it again"
                if legacy
                else ""
            )
            raise CheckpointError(f"{directory} has no {WEIGHTS} nor {INDEX}{hint}")
        path = regular_file(directory / single, CheckpointError, "safetensors file", directory)
        with SafetensorsReader(path) as reader:
            return reader.mapped()
    index = directory / f"{weights}.index.json"
    weight_map = _index(index)
    shards: dict[str, dict[str, np.ndarray]] = {}
    for file in dict.fromkeys(weight_map.values()):
        path = regular_file(
            directory / file, CheckpointError, f"safetensors shard of {index}", directory
        )
        with SafetensorsReader(path) as reader:
            shards[file] = reader.mapped()
    missing = [k for k, file in weight_map.items() if k not in shards[file]]
    if missing:
        raise CheckpointError(
            f"{index} lists tensors its shards do not hold ({missing[:5]}); the "
            "directory is incomplete, re-save or re-download it"
        )
    return {k: shards[file][k] for k, file in weight_map.items()}


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` is absent, empty, or holds only what ``save_pretrained`` writes."""
    if not path.exists():
        return True
    return path.is_dir() and all(
        e.is_file() and _MODEL_FILES.fullmatch(e.name) for e in path.iterdir()
    )


def write_pretrained(
    directory: str | os.PathLike,
    config: Mapping[str, Any],
    specs: Mapping[str, TensorSpec],
    tensors: Iterable[tuple[str, np.ndarray]],
    weights_file: str = WEIGHTS,
) -> None:
    """Write ``config.json`` and one ``model.safetensors`` (``weights_file``) as a new directory,
    atomically.

    The directory is assembled in a staging directory beside ``directory`` and renamed into
    place when complete; on any failure nothing is left. An existing ``directory`` is replaced
    only if it holds nothing but a model's config and weights (tokenizer files, for example,
    are never deleted: the write is refused).

    Args:
        directory: destination.
        config: the config.json content.
        specs: library name -> spec of every tensor that will come.
        tensors: (library name, array) pairs, each name of ``specs`` once.
        weights_file: the weights' file name (diffusers: :data:`DIFFUSERS_WEIGHTS`).
    """
    with atomic_dir(directory, is_model_dir, "a Hugging Face model directory") as target:
        target.mkdir()
        (target / CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        # {"format": "pt"}: transformers expects it of PyTorch-layout safetensors files.
        write_safetensors(target / weights_file, specs, tensors, metadata={"format": "pt"})


def check_architecture(hf: HfInterop, found: Config, cfg: Config, where: str | os.PathLike) -> None:
    """Raise a CheckpointError when the checkpoint's config differs from ``cfg`` in a field of
    ``hf.architecture`` (layer count, widths, heads, eps: fields that change the model but not
    always the tensor shapes)."""
    diff = [
        f"{f} {getattr(found, f)} in the checkpoint, {getattr(cfg, f)} in the config"
        for f in hf.architecture
        if getattr(found, f) != getattr(cfg, f)
    ]
    if diff:
        raise CheckpointError(
            f"{where}/{CONFIG} does not match the config: {'; '.join(diff)}; build the config "
            f"from the checkpoint with wl.config_from_hf({str(where)!r}) (nothing was loaded)"
        )

"""LoRA adapters to and from PEFT's format: ``adapter_config.json``, ``adapter_model.safetensors``.

See :mod:`mlperf_tutor.workloads.llama.hf` for the two layouts ("fused" for the MLPerf
reference's fused-qkv model, "hf" for transformers' stock ``LlamaForCausalLM``). Only adapters
move: a PEFT directory holds no base weights. PEFT itself is not imported; its files are written
with safetensors, as ``PeftModel.save_pretrained`` writes them (the adapter name "default" is not
part of the keys), and ``PeftModel.from_pretrained`` reads ours.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mlperf_tutor import convert
from mlperf_tutor.core.checkpoint import CheckpointError, Tree, check_tree
from mlperf_tutor.core.config import ConfigSource, Invalid
from mlperf_tutor.core.files import read_json
from mlperf_tutor.core.io import atomic_dir
from mlperf_tutor.layers.spec import is_adapter
from mlperf_tutor.workloads.llama.config import LORA_TARGETS, LlamaConfig
from mlperf_tutor.workloads.llama.hf import _SPLIT, _split_qkv

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LAYOUTS = {"fused": LORA_TARGETS, "hf": (*_SPLIT, "o_proj")}
_PREFIX = "base_model.model.model.layers"
_KEY = re.compile(rf"{re.escape(_PREFIX)}\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight")


def adapter_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    from mlperf_tutor.workloads.llama import canonical_shapes

    return {k: s for k, s in canonical_shapes(cfg).items() if is_adapter(k)}


def _peft_config(cfg: LlamaConfig, layout: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(LAYOUTS[layout]),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def to_peft(tree: Mapping[str, np.ndarray], cfg: LlamaConfig, layout: str = "hf") -> Tree:
    """The adapters of ``tree`` under PEFT's names (``layout`` "hf": q/k/v share ``lora_A`` and
    split ``lora_B``'s rows)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    out = {}
    for name, array in tree.items():
        match = re.fullmatch(r"blocks\.(\d+)\.attention\.(\w+)\.lora_([ab])\.weight", name)
        if not match:
            continue
        index, module, ab = match.groups()
        key = f"{_PREFIX}.{index}.self_attn.{{}}.lora_{ab.upper()}.weight"
        if module == "qkv_proj" and layout == "hf":
            parts = [array] * 3 if ab == "a" else _split_qkv(array, cfg)
            out |= {key.format(p): part for p, part in zip(_SPLIT, parts, strict=True)}
        else:
            out[key.format(module)] = array
    return out


def from_peft(state: Mapping[str, np.ndarray], cfg: LlamaConfig, where: str) -> Tree:
    """PEFT adapter tensors (either layout) -> canonical adapter tree."""
    found: dict[tuple[str, str, str], np.ndarray] = {}
    for key, array in state.items():
        match = _KEY.fullmatch(key)
        if not match:
            raise CheckpointError(
                f"{where} holds {key!r}, which is not a LoRA weight of a Llama attention "
                "projection; llama2_70b_lora reads adapters on qkv_proj/q_proj/k_proj/v_proj "
                "and o_proj"
            )
        found[match.groups()] = array
    tree = {}
    for index in sorted({i for i, _, _ in found}, key=int):
        for module in ("qkv_proj", "o_proj"):
            for ab in ("A", "B"):
                value = _canonical_part(found, index, module, ab, where)
                if value is not None:
                    tree[f"blocks.{index}.attention.{module}.lora_{ab.lower()}.weight"] = value
    return tree


def _canonical_part(found, index, module, ab, where) -> np.ndarray | None:
    if module != "qkv_proj" or (index, "qkv_proj", ab) in found:
        return found.get((index, module, ab))
    parts = [found.get((index, p, ab)) for p in _SPLIT]
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise CheckpointError(
            f"{where} has LoRA weights for some of q_proj/k_proj/v_proj of layer {index} but "
            "not all three; the fused qkv_proj needs all of them"
        )
    if ab == "B":
        return np.concatenate(parts, axis=0)
    if not (np.array_equal(parts[0], parts[1]) and np.array_equal(parts[0], parts[2])):
        raise CheckpointError(
            f"{where}: the q_proj, k_proj and v_proj adapters of layer {index} have different "
            "lora_A matrices, so they are not one adapter on the fused qkv_proj (as this "
            "package and the MLPerf reference train); they cannot be loaded"
        )
    return parts[0]


def save_adapter(
    tree: Mapping[str, np.ndarray], cfg: LlamaConfig, directory, layout: str = "hf"
) -> None:
    """Write the adapters of ``tree`` as a PEFT adapter directory, atomically.

    Args:
        tree: canonical weights holding the adapters (base weights are ignored).
        cfg: the config (rank, alpha and dropout go to adapter_config.json).
        directory: destination (a new or PEFT-only directory).
        layout: "hf" for transformers' ``LlamaForCausalLM``, "fused" for the reference's model.

    Raises:
        ValueError: ``cfg`` has no adapters, or an unknown layout.
        CheckpointMismatch: adapters missing or misshapen (every key named).
    """
    if not cfg.lora_rank:
        raise ValueError("cfg has lora_rank 0: there are no adapters to save")
    adapters = {k: v for k, v in tree.items() if is_adapter(k)}
    specs = {k: (s, "float32") for k, s in adapter_shapes(cfg).items()}
    check_tree(specs, adapters, where=f"the adapters for {directory}", check_dtype=False)
    peft = to_peft(adapters, cfg, layout)
    convert.specs_of(peft, str(directory))  # only storable arrays, before anything is written
    config = _peft_config(cfg, layout)

    def replaceable(path: Path) -> bool:
        return not path.exists() or all(e.name in (CONFIG, WEIGHTS) for e in path.iterdir())

    with atomic_dir(directory, replaceable, "a PEFT adapter directory") as target:
        target.mkdir()
        (target / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        convert.save(peft, target / WEIGHTS)  # with {"format": "pt"}, as PEFT writes


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The parsed ``adapter_config.json`` of a PEFT directory (a JSON object; not yet checked).

    Raises:
        CheckpointError: no such file, or not a regular file holding a JSON object.
    """
    path = Path(directory) / CONFIG
    if not path.exists():
        raise CheckpointError(f"{directory} has no {CONFIG}; is it a PEFT adapter directory?")
    return read_json(path, CheckpointError, "PEFT adapter config")


def check_adapter_config(config: dict, cfg: LlamaConfig, where: str) -> None:
    """Refuse a PEFT config that is not plain LoRA with ``cfg``'s rank and alpha, or whose
    values have the wrong type or range (``r`` an integer >= 1, ``lora_alpha`` a positive
    number, ``lora_dropout`` in [0, 1)).

    Raises:
        CheckpointError: naming ``where`` and the key.
    """
    src = ConfigSource(LlamaConfig, config, where, CheckpointError)
    src.require("peft_type", "LORA", "has {key}={got}; llama2_70b_lora reads LoRA adapters only")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        src.require(key, False, "has {key}={got}; a plain LoRA adapter has {key}=False")
    src.require("bias", "none", "has {key}={got}; our LoRA adapters have no biases (bias 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if src.mapping(key, {}):
            src.fail(f"has a {key}; one rank and alpha for every adapter is all we read")
    targets = src.get("target_modules", None, _target_modules)
    if targets is not None and not set(targets) <= {*LAYOUTS["fused"], *LAYOUTS["hf"]}:
        src.fail(
            f"has target_modules {targets}; llama2_70b_lora reads adapters on "
            f"{sorted({*LAYOUTS['fused'], *LAYOUTS['hf']})}"
        )
    found = {
        "r": src.integer("r"),
        "lora_alpha": src.field("lora_alpha", "lora_alpha"),
    }
    src.field("lora_dropout", "lora_dropout", 0.0)
    for key, want in (("r", cfg.lora_rank), ("lora_alpha", cfg.lora_alpha)):
        if found[key] != want:
            src.fail(
                f"has {key}={found[key]!r} but the config needs {want!r}; set "
                "lora_rank/lora_alpha to match, or use a plain LoRA adapter"
            )


def _target_modules(value) -> list[str] | None:
    """PEFT's list of module names; None for its other form, one regular expression (not run
    here: the weights' names are checked instead)."""
    if isinstance(value, str):
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"must be a list of module names or a pattern, got {value!r:.60}")
    return value


def load_adapter(directory: str | os.PathLike, cfg: LlamaConfig) -> Tree:
    """Read a PEFT LoRA directory (either layout) into canonical adapter weights for ``cfg``.

    Raises:
        CheckpointError: missing or corrupt files, a PEFT config that is not plain LoRA with
            ``cfg``'s rank and alpha (or holds a value of the wrong type or range), or weights
            missing, unexpected or misshapen.
    """
    config = read_adapter_config(directory)
    check_adapter_config(config, cfg, str(Path(directory) / CONFIG))
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}")
    state = {k: np.array(v) for k, v in convert.iter_tensors(weights)}
    tree = from_peft(state, cfg, str(directory))
    specs = {k: (s, "float32") for k, s in adapter_shapes(cfg).items()}
    check_tree(specs, tree, where=str(directory), check_dtype=False)
    return tree

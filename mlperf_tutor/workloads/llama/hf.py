"""Hugging Face interop of Llama 2 LoRA: ``LlamaForCausalLM`` base weights, PEFT LoRA adapters.

Base weights. transformers' ``LlamaForCausalLM`` has separate ``q_proj``, ``k_proj`` and
``v_proj``; the checkpoint the MLPerf reference fine-tunes (mlcommons/training
``llama2_70b_lora``, model type ``custom_llama``) fuses them into ``self_attn.qkv_proj``, rows
[q | k | v], as our canonical ``attention.qkv_proj`` does. Both are read; ``save_pretrained``
writes the standard un-fused ``LlamaForCausalLM``. Every matrix is an ``nn.Linear`` (our layout):
the mapping is a rename plus the q/k/v split or concatenation.

Adapters. PEFT saves ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.model.layers.{i}.self_attn.{module}.lora_A.weight`` (r, in) and
``lora_B.weight`` (out, r). Two layouts:

* ``"fused"``: target modules ``qkv_proj`` and ``o_proj``, for the reference's fused model;
  the adapters are ours, renamed.
* ``"hf"``: ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``, for a stock ``LlamaForCausalLM``.
  One adapter on the fused projection, ``B A``, equals three adapters that share ``A`` and take
  the q, k and v rows of ``B``: exact, so PEFT itself runs our adapters on transformers' model.
  Reading such a file back needs the three ``A`` to be equal (what we write); adapters trained
  separately per projection have no fused equivalent and are refused.

Nothing here imports transformers or PEFT: files are read and written with safetensors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlperf_tutor import convert
from mlperf_tutor.core.checkpoint import CheckpointError, Tree, check_tree
from mlperf_tutor.core.config import ConfigError, ConfigSource
from mlperf_tutor.core.interop import HfInterop
from mlperf_tutor.layers.spec import is_adapter
from mlperf_tutor.workloads.llama.config import LlamaConfig

# Config fields a checkpoint fixes (convert refuses a config that differs in one of them).
ARCHITECTURE = (
    "num_layers",
    "hidden",
    "num_heads",
    "num_kv_heads",
    "ffn",
    "vocab_size",
    "norm_eps",
    "rotary_base",
)
MODEL_TYPES = ("llama", "custom_llama")  # transformers' Llama; the MLPerf reference's fused one
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_LAYOUTS = ("fused", "hf")
_PEFT_PREFIX = "base_model.model."

# canonical module inside blocks.{i} -> module inside model.layers.{i}
_BLOCK = {
    "attention_norm": "input_layernorm",
    "attention.qkv_proj": "self_attn.qkv_proj",
    "attention.o_proj": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.fc_gate": "mlp.gate_proj",
    "mlp.fc_in": "mlp.up_proj",
    "mlp.fc_out": "mlp.down_proj",
}
_TOP = {"word_embeddings": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}
_SPLIT = ("q_proj", "k_proj", "v_proj")


def _qkv_rows(cfg: LlamaConfig) -> list[int]:
    """Row counts of q, k and v inside the fused projection."""
    h = cfg.head_dim
    return [cfg.num_heads * h, cfg.num_kv_heads * h, cfg.num_kv_heads * h]


def _split_qkv(array: np.ndarray, cfg: LlamaConfig, axis: int = 0) -> list[np.ndarray]:
    return np.split(array, np.cumsum(_qkv_rows(cfg))[:-1], axis=axis)


# --- config ---------------------------------------------------------------------------------
def _rope_theta(src: ConfigSource) -> float:
    params = src.mapping("rope_parameters", None) or {}
    scaling = src.data.get("rope_scaling")
    rope_type = params.get("rope_type", "default")
    if scaling or rope_type != "default":
        src.fail(
            f"scales rotary positions ({scaling or rope_type!r}); Llama 2 does not and our "
            "decoder cannot load this model"
        )
    if "rope_theta" in params:
        nested = ConfigSource(LlamaConfig, params, f"{src.where}: rope_parameters", src.error)
        return nested.field("rope_theta", "rotary_base")
    return src.field("rope_theta", "rotary_base", 10000.0)


def config_from_hf(hf_config: Any, preset: str = "mlperf", **overrides) -> LlamaConfig:
    """Our config of a Llama model: architecture from ``hf_config``, the rest (LoRA, optimizer,
    sequence length) from ``preset``; ``seq_len`` shrinks to the model's positions if needed.

    Raises:
        ConfigError: not a Llama config, a feature our decoder lacks, or a value of the wrong
            type or range (the key is named), or an override of an architecture field;
            ``CheckpointError`` instead when ``hf_config`` is a file or directory.
    """
    data, where, error = convert.hf_config_dict(hf_config)
    return _config(ConfigSource(LlamaConfig, data, where, error), preset, overrides)


def _config(src: ConfigSource, preset: str, overrides: dict) -> LlamaConfig:
    if src.data.get("model_type") not in MODEL_TYPES:
        src.fail(
            f"has model_type={src.data.get('model_type')!r}; llama2_70b_lora reads "
            f"LlamaForCausalLM checkpoints (model_type one of {list(MODEL_TYPES)})"
        )
    for key, want in (
        ("hidden_act", "silu"),
        ("attention_bias", False),
        ("mlp_bias", False),
        ("tie_word_embeddings", False),
    ):
        src.require(
            key,
            want,
            "has {key}={got}; Llama 2 has {key}={want!r} and our decoder cannot load this model",
        )
    heads = src.field("num_attention_heads", "num_heads")
    hidden = src.field("hidden_size", "hidden")
    head_dim = src.integer("head_dim", None, none=True)
    if head_dim not in (None, hidden // heads):
        src.fail(
            f"has head_dim={head_dim}, not hidden_size / num_attention_heads = "
            f"{hidden // heads}; our decoder cannot load this model"
        )
    kv_heads = src.field("num_key_value_heads", "num_kv_heads", None)
    fields = {
        "num_layers": src.field("num_hidden_layers", "num_layers"),
        "hidden": hidden,
        "num_heads": heads,
        "num_kv_heads": heads if kv_heads is None else kv_heads,
        "ffn": src.field("intermediate_size", "ffn"),
        "vocab_size": src.field("vocab_size", "vocab_size"),
        "norm_eps": src.field("rms_norm_eps", "norm_eps", 1e-6),
        "rotary_base": _rope_theta(src),
        "max_positions": src.field("max_position_embeddings", "max_positions", 4096),
        "init_std": src.field("initializer_range", "init_std", 0.02),
    }
    fixed = sorted(set(overrides) & set(ARCHITECTURE))
    if fixed:
        raise ConfigError(f"{fixed} come from {src.where}; they cannot be overridden")
    base = LlamaConfig.preset(preset)
    seq_len = overrides.get("seq_len", min(base.seq_len, fields["max_positions"]))
    return src.build(preset, fields | {"seq_len": seq_len}, overrides)


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """The config.json of ``cfg``'s base model for transformers' ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_theta": cfg.rotary_base, "rope_type": "default"},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
    }


# --- base weights ---------------------------------------------------------------------------
def _hf_name(name: str) -> str:
    """Canonical base name -> the fused-model name (``self_attn.qkv_proj`` kept)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.weight", name)
    if match and match.group(2) in _BLOCK:
        return f"model.layers.{match.group(1)}.{_BLOCK[match.group(2)]}.weight"
    module = name.removesuffix(".weight")
    if module in _TOP:
        return f"{_TOP[module]}.weight"
    raise ValueError(f"canonical llama2_70b_lora name {name!r} has no LlamaForCausalLM key")


def base_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    from mlperf_tutor.workloads.llama import canonical_shapes  # the package imports us

    return canonical_shapes(cfg, adapters=False)


def to_hf(tree: Mapping[str, np.ndarray], cfg: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(``LlamaForCausalLM`` name, array) of the base weights in ``tree`` (adapters skipped),
    the fused q/k/v split into views."""
    for name, array in tree.items():
        if is_adapter(name):
            continue
        theirs = _hf_name(name)
        if theirs.endswith("qkv_proj.weight"):
            for proj, part in zip(_SPLIT, _split_qkv(array, cfg), strict=True):
                yield theirs.replace("qkv_proj", proj), part
        else:
            yield theirs, array


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``LlamaForCausalLM`` name -> shape of every base tensor."""
    shapes = {}
    for name, shape in base_shapes(cfg).items():
        theirs = _hf_name(name)
        if theirs.endswith("qkv_proj.weight"):
            for proj, rows in zip(_SPLIT, _qkv_rows(cfg), strict=True):
                shapes[theirs.replace("qkv_proj", proj)] = (rows, shape[1])
        else:
            shapes[theirs] = shape
    return shapes


def from_hf(state: Mapping[str, np.ndarray], cfg: LlamaConfig) -> Tree:
    """A ``LlamaForCausalLM`` (or fused reference) state dict -> canonical base tree, in
    canonical order; q/k/v are concatenated into ``qkv_proj``."""
    tree = {}
    for name in base_shapes(cfg):
        theirs = _hf_name(name)
        if theirs.endswith("qkv_proj.weight") and theirs not in state:
            parts = [state[theirs.replace("qkv_proj", p)] for p in _SPLIT]
            tree[name] = np.concatenate(parts, axis=0)
        else:
            tree[name] = state[theirs]
    return tree


def load_pretrained(directory: str | os.PathLike) -> tuple[LlamaConfig, Tree]:
    """Read a ``save_pretrained`` directory of ``LlamaForCausalLM`` or of the reference's fused
    model (memory-mapped): (config from :func:`config_from_hf`, canonical base tree).

    Raises:
        CheckpointError: another architecture, missing or corrupt files, or tensors missing,
            unexpected or misshapen (every one named, in Hugging Face names).
    """
    config = convert.read_hf_config(directory)
    src = ConfigSource(LlamaConfig, config, Path(directory) / convert.HF_CONFIG, CheckpointError)
    cfg = _config(src, "mlperf", {}).replace(lora_rank=0)
    expected = hf_shapes(cfg)
    convert.check_hf_declared_size(directory, expected, src.sizes(cfg))
    state = convert.read_hf_weights(directory)
    if any(k.endswith("self_attn.qkv_proj.weight") for k in state):  # the fused reference model
        expected = {_hf_name(k): s for k, s in base_shapes(cfg).items()}
    check_tree(
        {k: (s, "float32") for k, s in expected.items()},
        state,
        where=str(directory),
        check_dtype=False,
        hint="llama2_70b_lora reads LlamaForCausalLM checkpoints",
    )
    return cfg, from_hf(state, cfg)


def save_pretrained(tree: Mapping[str, np.ndarray], cfg: LlamaConfig, directory) -> None:
    """Write the base weights of ``tree`` as a ``LlamaForCausalLM`` directory (un-fused q/k/v),
    tensor by tensor, atomically.

    ``LlamaForCausalLM`` has no place for adapters: untrained ones (``lora_b`` zero, a no-op) are
    left out; trained ones are refused rather than lost. Save them with
    :func:`mlperf_tutor.workloads.llama.peft.save_adapter`, or fold them into the base first with
    :func:`merge_adapters`.

    Raises:
        ValueError: ``tree`` holds trained adapters.
        CheckpointMismatch: the tree does not fit ``cfg`` (every bad key named).
    """
    trained = [k for k, v in tree.items() if k.endswith("lora_b.weight") and np.any(v)]
    if trained:
        raise ValueError(
            f"the tree holds trained LoRA adapters ({trained[0]}, ...), which LlamaForCausalLM "
            "cannot hold; save them with mlperf_tutor.workloads.llama.peft.save_adapter, or "
            "merge them into the base with mlperf_tutor.workloads.llama.hf.merge_adapters"
        )
    base = {k: v for k, v in tree.items() if not is_adapter(k)}
    specs = {k: (s, "float32") for k, s in base_shapes(cfg).items()}
    check_tree(specs, base, where=f"the tree for {directory}", check_dtype=False)
    ours = convert.specs_of(base, str(directory))
    config = config_to_hf(cfg) | {"dtype": ours["word_embeddings.weight"].dtype.name}
    out = {
        k: convert.TensorSpec(s, ours[_canonical_of(k)].dtype) for k, s in hf_shapes(cfg).items()
    }
    convert.write_hf_directory(directory, config, out, to_hf(base, cfg))


def merge_adapters(tree: Mapping[str, np.ndarray], cfg: LlamaConfig) -> Tree:
    """The base weights with every adapter folded in, ``W + (alpha / r) B A`` (PEFT's
    ``merge_and_unload``): the same function as the LoRA model in eval mode, without adapters."""
    merged = {}
    for name, value in tree.items():
        if is_adapter(name):
            continue
        module = name.removesuffix(".weight")
        if f"{module}.lora_a.weight" in tree:
            a, b = tree[f"{module}.lora_a.weight"], tree[f"{module}.lora_b.weight"]
            update = cfg.lora_scaling * (b.astype(np.float64) @ a.astype(np.float64))
            value = (value.astype(np.float64) + update).astype(value.dtype)
        merged[name] = value
    return merged


def _canonical_of(hf_name: str) -> str:
    for proj in _SPLIT:
        hf_name = hf_name.replace(f"self_attn.{proj}", "self_attn.qkv_proj")
    for ours, theirs in _BLOCK.items():
        match = re.fullmatch(rf"model\.layers\.(\d+)\.{re.escape(theirs)}\.weight", hf_name)
        if match:
            return f"blocks.{match.group(1)}.{ours}.weight"
    for ours, theirs in _TOP.items():
        if hf_name == f"{theirs}.weight":
            return f"{ours}.weight"
    raise ValueError(f"{hf_name!r} is not a LlamaForCausalLM key")


# What the llama2_70b_lora workload's ``hf`` attribute gives convert and users (PEFT adapters:
# ``mlperf_tutor.workloads.llama.peft``).
INTEROP = HfInterop(
    architecture=ARCHITECTURE,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    load_pretrained=load_pretrained,
    save_pretrained=save_pretrained,
)

"""Hugging Face transformers ``BertForPreTraining`` <-> canonical BERT: names, config, files.

Layouts are the same (both are PyTorch ``state_dict``s), so interop is a rename table. The MLM
decoder's weight is tied to the word embeddings and its bias to ``cls.predictions.bias``; those
tied copies are dropped when reading and, as transformers 5 does, not written.

``load_pretrained`` and ``save_pretrained`` read and write ``save_pretrained`` directories
(config.json + safetensors) without importing transformers; :data:`INTEROP` (the workload's
``hf``) hands them to ``mlperf_tutor.convert``, which calls them for any path it recognises as a
Hugging Face directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlperf_tutor import convert
from mlperf_tutor.core.checkpoint import CheckpointError, Tree, check_tree
from mlperf_tutor.core.config import ConfigError, ConfigSource
from mlperf_tutor.core.interop import HfInterop
from mlperf_tutor.workloads.bert.config import BertConfig

# canonical pattern -> HF pattern; "{i}" is a layer index.
_BLOCK = {
    "attention.q_proj": "attention.self.query",
    "attention.k_proj": "attention.self.key",
    "attention.v_proj": "attention.self.value",
    "attention.o_proj": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "mlp.fc_in": "intermediate.dense",
    "mlp.fc_out": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
_TOP = {
    "embeddings.word_embeddings": "bert.embeddings.word_embeddings",
    "embeddings.position_embeddings": "bert.embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "bert.embeddings.token_type_embeddings",
    "embeddings.norm": "bert.embeddings.LayerNorm",
    "pooler.dense": "bert.pooler.dense",
    "mlm_head.dense": "cls.predictions.transform.dense",
    "mlm_head.norm": "cls.predictions.transform.LayerNorm",
    "nsp_head": "cls.seq_relationship",
}
# Tied copies HF keeps in its state_dict (transformers 5 does not write them to safetensors;
# older files have them).
TIED = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
# Buffers of HF's model that are not weights.
IGNORED = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
# Checkpoints converted from Google's TF release name LayerNorm leaves gamma/beta; transformers
# renames them on load, and so do we.
_LEGACY = {"gamma": "weight", "beta": "bias"}

# Config fields a checkpoint fixes (convert refuses a config that differs in one of them);
# dropout and init_std are training settings.
ARCHITECTURE = (
    "num_layers",
    "hidden",
    "num_heads",
    "ffn",
    "vocab_size",
    "max_positions",
    "type_vocab_size",
    "norm_eps",
)
# BertConfig field -> transformers BertConfig key.
_FIELDS = {
    "num_layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "num_heads": "num_attention_heads",
    "ffn": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_positions": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "norm_eps": "layer_norm_eps",
    "dropout": "hidden_dropout_prob",
    "init_std": "initializer_range",
}
# transformers' BertConfig defaults (bert-base-uncased), used for keys a config.json leaves out,
# exactly as transformers does.
HF_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
}


def to_hf_name(name: str) -> str:
    """Canonical name -> HF ``BertForPreTraining`` name."""
    if name == "mlm_head.bias":
        return "cls.predictions.bias"
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if match:
        index, module, leaf = match.groups()
        if module in _BLOCK:
            return f"bert.encoder.layer.{index}.{_BLOCK[module]}.{leaf}"
    module, _, leaf = name.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    raise ValueError(f"canonical BERT name {name!r} has no Hugging Face counterpart")


def from_hf_name(name: str) -> str:
    """HF ``BertForPreTraining`` name -> canonical name."""
    if name == "cls.predictions.bias":
        return "mlm_head.bias"
    match = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
    if match:
        index, module, leaf = match.groups()
        for ours, theirs in _BLOCK.items():
            if module == theirs:
                return f"blocks.{index}.{ours}.{leaf}"
    module, _, leaf = name.rpartition(".")
    for ours, theirs in _TOP.items():
        if module == theirs:
            return f"{ours}.{leaf}"
    raise ValueError(
        f"Hugging Face key {name!r} is not part of BertForPreTraining; is this a BERT "
        "pre-training checkpoint?"
    )


def from_hf(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An HF ``BertForPreTraining`` state dict (numpy) -> canonical tree (tied copies dropped)."""
    return {from_hf_name(k): v for k, v in state.items() if k not in TIED and k not in IGNORED}


def to_hf(tree: Mapping[str, np.ndarray], tied: bool = False) -> dict[str, np.ndarray]:
    """Canonical tree -> HF names; ``tied=True`` adds the decoder's tied copies too."""
    state = {to_hf_name(k): v for k, v in tree.items()}
    if tied:
        state |= {copy: state[source] for copy, source in TIED.items()}
    return state


# --- config -----------------------------------------------------------------------------------
def config_from_hf(hf_config: Any, preset: str = "mlperf", **overrides) -> BertConfig:
    """The :class:`BertConfig` of a transformers BERT model.

    The architecture (layers, widths, heads, vocabulary, positions, LayerNorm eps), the init
    std and the dropout come from ``hf_config``; training settings from ``preset``. BertConfig
    has one dropout rate, for hidden states and attention probabilities alike (both 0.1 in
    BERT): it is ``hidden_dropout_prob``, and a different ``attention_probs_dropout_prob`` is
    not kept (pass ``dropout=`` to choose another). When the
    model has fewer positions than the preset's ``seq_len``, ``seq_len`` becomes the number of
    positions; whenever ``seq_len`` ends up shorter than the preset's, ``max_predictions``
    shrinks in proportion (76 of 512 -> 10 of 64) unless it is given.

    Args:
        hf_config: a transformers ``BertConfig``, its dict, a config.json path or a
            ``save_pretrained`` directory.
        preset: the preset that supplies the non-architecture fields.
        **overrides: other fields (not architecture ones, which the checkpoint fixes).

    Raises:
        ConfigError: not a BERT model, a feature our BERT lacks (activation other than exact
            GELU, relative positions, decoder/cross-attention, untied decoder), a value of the
            wrong type or range (the key is named), or an override of an architecture field;
            ``CheckpointError`` instead when ``hf_config`` is a file or directory.
    """
    data, where, error = convert.hf_config_dict(hf_config)
    return _config(ConfigSource(BertConfig, data, where, error), preset, overrides)


def _config(src: ConfigSource, preset: str, overrides: dict) -> BertConfig:
    if src.data.get("model_type") != "bert":
        src.fail(
            f"has model_type={src.data.get('model_type')!r}; the bert workload reads "
            "BertForPreTraining checkpoints (model_type='bert')"
        )
    refused = {
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
    }
    for key, want in refused.items():
        src.require(
            key,
            want,
            "has {key}={got}; the bert workload implements BERT as in MLPerf ({key}={want!r}) "
            "and cannot load this model",
        )
    fixed = sorted(set(overrides) & set(ARCHITECTURE))
    if fixed:
        raise ConfigError(f"{fixed} come from {src.where}; they cannot be overridden")
    # attention_probs_dropout_prob has no field of its own (see config_from_hf).
    fields = {
        ours: src.field(theirs, ours, HF_DEFAULTS[theirs]) for ours, theirs in _FIELDS.items()
    }
    base = BertConfig.preset(preset)
    seq_len = overrides.get("seq_len", min(base.seq_len, fields["max_positions"]))
    if isinstance(seq_len, int) and seq_len < base.seq_len and "max_predictions" not in overrides:
        fields["max_predictions"] = max(1, round(base.max_predictions * seq_len / base.seq_len))
    return src.build(preset, fields | {"seq_len": seq_len}, overrides)


def config_to_hf(cfg: BertConfig) -> dict[str, Any]:
    """The config.json of ``cfg`` for transformers' ``BertForPreTraining``."""
    return {
        "architectures": ["BertForPreTraining"],
        "model_type": "bert",
        **{theirs: getattr(cfg, ours) for ours, theirs in _FIELDS.items()},
        "attention_probs_dropout_prob": cfg.dropout,
        "hidden_act": "gelu",  # transformers' "gelu" is the exact (erf) GELU of the reference
        "pad_token_id": 0,
        "tie_word_embeddings": True,
        "is_decoder": False,
        "add_cross_attention": False,
        "dtype": "float32",
    }


# --- save_pretrained directories --------------------------------------------------------------
def _specs(cfg: BertConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Canonical name -> (shape, dtype) of every weight of ``cfg``."""
    from mlperf_tutor.workloads.bert import canonical_shapes  # the package imports this module

    return {k: (s, "float32") for k, s in canonical_shapes(cfg).items()}


def load_pretrained(directory: str | os.PathLike) -> tuple[BertConfig, Tree]:
    """Read a transformers ``save_pretrained`` directory of ``BertForPreTraining``.

    Reads config.json and ``model.safetensors`` (or the shards of
    ``model.safetensors.index.json``) without transformers; tensors are memory-mapped.

    Returns:
        (config from :func:`config_from_hf` with the ``mlperf`` preset, canonical tree).

    Raises:
        CheckpointError: not a BERT pre-training directory, missing or corrupt files, tensors
            missing, unexpected or misshapen (every one named, in HF names), or a decoder
            weight that is not tied to the word embeddings.
    """
    config = convert.read_hf_config(directory)
    src = ConfigSource(BertConfig, config, Path(directory) / convert.HF_CONFIG, CheckpointError)
    cfg = _config(src, "mlperf", {})
    expected = {to_hf_name(k): spec for k, spec in _specs(cfg).items()}
    convert.check_hf_declared_size(
        directory, {k: s for k, (s, _) in expected.items()}, src.sizes(cfg)
    )
    state, tied = {}, {}
    for name, array in convert.read_hf_weights(directory).items():
        module, _, leaf = name.rpartition(".")
        if module.endswith("LayerNorm") and leaf in _LEGACY:
            name = f"{module}.{_LEGACY[leaf]}"
        if name in TIED:
            tied[name] = array
        elif name not in IGNORED:
            state[name] = array
    # Checked in HF names, so that the message names what the user's files hold.
    check_tree(
        expected,
        state,
        where=str(directory),
        check_dtype=False,
        hint=f"mlperf_tutor reads BertForPreTraining checkpoints (this one's architectures: "
        f"{config.get('architectures')})",
    )
    for copy, source in TIED.items():
        if copy in tied and not _same_bits(tied[copy], state[source]):
            raise CheckpointError(
                f"{directory} holds a {copy} that differs from {source}; our BERT ties them "
                "(as BertForPreTraining does), so this checkpoint cannot be loaded"
            )
    return cfg, {from_hf_name(name): state[name] for name in expected}


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def save_pretrained(
    tree: Mapping[str, np.ndarray], cfg: BertConfig, directory: str | os.PathLike
) -> None:
    """Write a canonical tree as a ``save_pretrained`` directory of ``BertForPreTraining``.

    Writes what transformers 5 writes: config.json and one ``model.safetensors`` without the
    tied decoder copies, so that ``BertForPreTraining.from_pretrained(directory)`` reports no
    missing or unexpected keys. Atomic: the directory appears complete or not at all.

    Raises:
        CheckpointMismatch: the tree does not fit ``cfg`` (every bad key named; nothing written).
        CheckpointError: the write failed, or ``directory`` exists and holds other files.
    """
    check_tree(_specs(cfg), tree, where=f"the tree for {directory}", check_dtype=False)
    state = to_hf(tree)
    specs = convert.specs_of(state, str(directory))
    config = config_to_hf(cfg)
    config["dtype"] = state["bert.embeddings.word_embeddings.weight"].dtype.name
    convert.write_hf_directory(directory, config, specs, iter(state.items()))


# What the bert workload's ``hf`` attribute gives convert and users.
INTEROP = HfInterop(
    architecture=ARCHITECTURE,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    load_pretrained=load_pretrained,
    save_pretrained=save_pretrained,
)

__all__ = [
    "ARCHITECTURE",
    "INTEROP",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "from_hf_name",
    "load_pretrained",
    "save_pretrained",
    "to_hf",
    "to_hf_name",
]

"""Hugging Face transformers ``BertForPreTraining`` naming <-> canonical BERT names.

Layouts are the same (both are PyTorch ``state_dict``s), so interop is a rename table. The MLM
decoder's weight is tied to the word embeddings and its bias to ``cls.predictions.bias``; those
tied copies are dropped when reading and written back when writing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

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
# Tied copies HF keeps in its state_dict (and may or may not write to safetensors).
TIED = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
# Buffers of HF's model that are not weights.
IGNORED = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


def to_hf_name(name: str) -> str:
    """Canonical name -> HF ``BertForPreTraining`` name."""
    if name == "mlm_head.bias":
        return "cls.predictions.bias"
    match = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
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
                return f"layers.{index}.{ours}.{leaf}"
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
    return {
        from_hf_name(k): v for k, v in state.items() if k not in TIED and k not in IGNORED
    }


def to_hf(tree: Mapping[str, np.ndarray], tied: bool = False) -> dict[str, np.ndarray]:
    """Canonical tree -> HF names; ``tied=True`` adds the decoder's tied copies too."""
    state = {to_hf_name(k): v for k, v in tree.items()}
    if tied:
        state |= {copy: state[source] for copy, source in TIED.items()}
    return state

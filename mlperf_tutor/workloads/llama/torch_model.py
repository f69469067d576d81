"""Llama 2 with LoRA adapters in PyTorch (MLPerf Training ``llama2_70b_lora``).

References: Touvron et al. 2023, Llama 2 (https://arxiv.org/abs/2307.09288); the fused-qkv model
the MLPerf reference fine-tunes (mlcommons/training ``llama2_70b_lora``); LoRA, Hu et al. 2021
(https://arxiv.org/abs/2106.09685). The forward is specified in ``workloads/llama/__init__.py``;
attribute names are the canonical names.
"""

from __future__ import annotations

import torch
from torch import nn

from mlperf_tutor.frameworks.torch import set_trainable
from mlperf_tutor.layers.spec import is_adapter
from mlperf_tutor.layers.torch.block import TransformerBlock
from mlperf_tutor.layers.torch.losses import next_token_loss
from mlperf_tutor.layers.torch.norms import RMSNorm
from mlperf_tutor.workloads.llama.config import LlamaConfig


class LlamaDecoder(nn.Module):
    """Llama 2 causal LM: token embeddings, L pre-RMSNorm blocks (grouped-query attention with
    rotary positions and a fused ``qkv_proj``, SwiGLU MLP), final RMSNorm, untied head.

    Takes a batch dict with ``input_ids`` (B, T), optional ``attention_mask`` (B, T) (0: padding
    key) and optional ``labels`` (B, T) aligned with ``input_ids`` (-100: not predicted);
    returns ``{"logits": (B, T, V)}`` plus ``"loss"``, the mean cross-entropy of predicting
    ``labels[:, t + 1]`` at position t over the labelled tokens, when labels are given.

    Args:
        cfg: the Llama config; ``lora_rank > 0`` puts adapters on ``qkv_proj`` and ``o_proj``.
        fused: ``F.scaled_dot_product_attention`` in every block (GPU benchmarks).
    """

    def __init__(self, cfg: LlamaConfig, *, fused: bool = False):
        super().__init__()
        self.spec = cfg.block_spec().with_fused(fused)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList([TransformerBlock(self.spec) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids = batch["input_ids"].long()  # (B, T)
        self.spec.check_length(input_ids.shape[1])
        key_mask = batch.get("attention_mask")  # (B, T) or None
        x = self.word_embeddings(input_ids)  # (B, T, D)
        for block in self.blocks:
            x = block(x, key_mask)
        logits = self.lm_head(self.final_norm(x))  # (B, T, V)
        out = {"logits": logits}
        if batch.get("labels") is not None:
            labels = batch["labels"].long()[:, 1:]  # (B, T - 1): the token after position t
            out["loss"] = next_token_loss(logits[:, :-1], labels)
        return out


def build(cfg: LlamaConfig, *, fused: bool = False, dtype: torch.dtype = torch.float32):
    """A LlamaDecoder with uninitialised weights (the workload loads them), built on the meta
    device; with LoRA only the adapters require gradients."""
    with torch.device("meta"):
        model = LlamaDecoder(cfg, fused=fused)
    model = model.to_empty(device="cpu").to(dtype)
    if cfg.lora_rank:
        set_trainable(model, is_adapter)
    return model

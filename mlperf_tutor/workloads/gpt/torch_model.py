"""GPT-3 and GPT-J decoders in PyTorch: one causal LM, two configs.

References: Brown et al. 2020, GPT-3 (https://arxiv.org/abs/2005.14165) as mlcommons/training
``large_language_model/megatron-lm`` trains it; GPT-J 6B (Wang & Komatsuzaki 2021,
https://github.com/kingoflolz/mesh-transformer-jax). The forward is specified in
``workloads/gpt/__init__.py``; attribute names are the canonical names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlperf_tutor.layers.torch.block import TransformerBlock
from mlperf_tutor.layers.torch.losses import next_token_loss
from mlperf_tutor.workloads.gpt.config import GptConfig


class GptEmbeddings(nn.Module):
    """Token embeddings (+ learned positions for GPT-3), then dropout.

    Args:
        cfg: the GPT config; ``position_embeddings`` exists only when ``cfg.position`` is
            "learned" (GPT-J rotates q and k in the attention instead).
    """

    def __init__(self, cfg: GptConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden)
        if cfg.position == "learned":
            self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        else:
            self.position_embeddings = None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)  # (B, T, D)
        if self.position_embeddings is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
            x = x + self.position_embeddings(positions)
        return self.dropout(x)


class GptDecoder(nn.Module):
    """Decoder-only causal language model: embeddings, L causal blocks, final LayerNorm, head.

    Takes a batch dict with ``input_ids`` (B, T) and optional ``labels`` (B, T) (-100: not
    predicted); returns ``{"logits": (B, T, V)}`` plus ``"loss"``, the mean next-token
    cross-entropy over the labelled tokens, when labels are given.

    Args:
        cfg: the GPT config (``gpt3`` or ``gptj``).
        fused: ``F.scaled_dot_product_attention`` with ``is_causal`` in every block (GPU
            benchmarks; see :class:`~mlperf_tutor.layers.torch.attention.Attention`).
    """

    def __init__(self, cfg: GptConfig, *, fused: bool = False):
        super().__init__()
        self.spec = cfg.block_spec().with_fused(fused)
        self.embeddings = GptEmbeddings(cfg)
        self.blocks = nn.ModuleList([TransformerBlock(self.spec) for _ in range(cfg.num_layers)])
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, bias=True)
        if cfg.tie_embeddings:
            self.lm_head = None  # logits from the word embedding matrix
        else:
            self.lm_head = nn.Linear(cfg.hidden, cfg.padded_vocab_size, bias=cfg.lm_head_bias)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids = batch["input_ids"].long()  # (B, T)
        self.spec.check_length(input_ids.shape[1])  # before the position table
        x = self.embeddings(input_ids)  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = F.linear(x, self.embeddings.word_embeddings.weight)  # (B, T, V)
        else:
            logits = self.lm_head(x)  # (B, T, V)
        out = {"logits": logits}
        if batch.get("labels") is not None:  # (B, T), already the next tokens
            out["loss"] = next_token_loss(logits, batch["labels"].long())
        return out


def build(cfg: GptConfig, *, fused: bool = False) -> GptDecoder:
    """A float32 GptDecoder with uninitialised weights; the workload loads them.

    Built on the meta device, so no time goes into random initialisation that
    ``load_canonical`` would overwrite.
    """
    with torch.device("meta"):
        model = GptDecoder(cfg, fused=fused)
    return model.to_empty(device="cpu").to(torch.float32)

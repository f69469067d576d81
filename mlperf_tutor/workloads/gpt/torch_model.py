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

from mlperf_tutor.layers.torch_layers import TransformerBlock
from mlperf_tutor.workloads.gpt.config import GptConfig
from mlperf_tutor.workloads.gpt.data import IGNORE_INDEX


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
            benchmarks; see :class:`~mlperf_tutor.layers.torch_layers.Attention`).
    """

    def __init__(self, cfg: GptConfig, *, fused: bool = False):
        super().__init__()
        self.max_positions = cfg.max_positions
        self.embeddings = GptEmbeddings(cfg)
        blocks = [
            TransformerBlock(
                cfg.hidden, cfg.num_heads, cfg.ffn, norm_eps=cfg.norm_eps,
                norm_position="parallel" if cfg.parallel_residual else "pre",
                activation=cfg.activation, bias=cfg.mlp_bias, attention_bias=cfg.attention_bias,
                dropout=cfg.dropout, attention_dropout=cfg.dropout, causal=True, fused=fused,
                rotary_dim=cfg.rotary_dim, rotary_base=cfg.rotary_base,
                rotary_layout="interleaved",
            )
            for _ in range(cfg.num_layers)
        ]  # fmt: skip
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, bias=True)
        if cfg.tie_embeddings:
            self.lm_head = None  # logits from the word embedding matrix
        else:
            self.lm_head = nn.Linear(cfg.hidden, cfg.padded_vocab_size, bias=cfg.lm_head_bias)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids = batch["input_ids"].long()  # (B, T)
        if input_ids.shape[1] > self.max_positions:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; the model takes at most "
                f"max_positions = {self.max_positions}"
            )
        x = self.embeddings(input_ids)  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = F.linear(x, self.embeddings.word_embeddings.weight)  # (B, T, V)
        else:
            logits = self.lm_head(x)  # (B, T, V)
        out = {"logits": logits}
        if batch.get("labels") is not None:
            labels = batch["labels"].long()  # (B, T)
            # "mean" with ignore_index is sum / count over the labelled tokens. In float32 at
            # least (bf16 logits lose the softmax's precision); float64 models stay float64.
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            out["loss"] = F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
            )
        return out


def build(cfg: GptConfig, *, fused: bool = False) -> GptDecoder:
    """A float32 GptDecoder with uninitialised weights; the workload loads them.

    Built on the meta device, so no time goes into random initialisation that
    ``load_canonical`` would overwrite.
    """
    with torch.device("meta"):
        model = GptDecoder(cfg, fused=fused)
    return model.to_empty(device="cpu").to(torch.float32)

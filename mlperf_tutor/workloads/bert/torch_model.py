"""BERT pre-training (masked LM + next-sentence prediction) in PyTorch.

Reference: mlcommons/training ``language_model/tensorflow/bert`` (modeling.py,
run_pretraining.py); Devlin et al. 2019 (https://arxiv.org/abs/1810.04805). The forward is
specified in ``workloads/bert/__init__.py``; attribute names are the canonical names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlperf_tutor.layers.torch.block import TransformerBlock
from mlperf_tutor.workloads.bert.config import MLM_DENOMINATOR_EPS, BertConfig


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout.

    Args:
        cfg: the BERT config.
    """

    def __init__(self, cfg: BertConfig):
        super().__init__()
        d = cfg.hidden
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d)
        self.position_embeddings = nn.Embedding(cfg.max_positions, d)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=True, bias=True)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (S,)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(segment_ids)
        x = x + self.position_embeddings(positions)  # (B, S, D)
        return self.dropout(self.norm(x))


class BertPooler(nn.Module):
    """``tanh(dense(x[:, 0]))``: the [CLS] token's summary of the sequence.

    Args:
        cfg: the BERT config.
    """

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # (B, S, D) -> (B, D)


class BertMlmHead(nn.Module):
    """``norm(gelu(dense(x))) @ word_embeddings.T + bias``; the decoder matrix is tied.

    Args:
        cfg: the BERT config.
    """

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, elementwise_affine=True, bias=True)
        self.bias = nn.Parameter(torch.empty(cfg.vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(x), approximate="none"))  # (B, P, D)
        return x @ word_embeddings.T + self.bias  # (B, P, V)


class BertPretraining(nn.Module):
    """BERT encoder with the masked-LM and next-sentence heads and their losses: ``mlm_loss``
    (the mean over masked positions), ``nsp_loss`` (the mean over examples) and their sum
    ``loss`` (the two means apart, so a sharded step can weight each by its own count).

    Args:
        cfg: the BERT config (dropout is ``cfg.dropout``, hidden and attention alike).
        fused: ``F.scaled_dot_product_attention`` in every block (GPU benchmarks; see
            :class:`~mlperf_tutor.layers.torch.attention.Attention`).
    """

    def __init__(self, cfg: BertConfig, *, fused: bool = False):
        super().__init__()
        self.spec = cfg.block_spec().with_fused(fused)
        self.embeddings = BertEmbeddings(cfg)
        self.blocks = nn.ModuleList([TransformerBlock(self.spec) for _ in range(cfg.num_layers)])
        self.pooler = BertPooler(cfg)
        self.mlm_head = BertMlmHead(cfg)
        self.nsp_head = nn.Linear(cfg.hidden, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.spec.check_length(batch["input_ids"].shape[1])  # before the position table
        x = self.embeddings(batch["input_ids"].long(), batch["segment_ids"].long())  # (B, S, D)
        for block in self.blocks:
            x = block(x, batch["input_mask"])
        positions = batch["masked_lm_positions"].long()  # (B, P)
        # Only the P masked positions go through the MLM head (V is large).
        picked = x.gather(1, positions[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, P, D)
        mlm_logits = self.mlm_head(picked, self.embeddings.word_embeddings.weight)  # (B, P, V)
        nsp_logits = self.nsp_head(self.pooler(x))  # (B, 2)

        labels = batch["masked_lm_ids"].long()  # (B, P)
        ce = F.cross_entropy(_at_least_f32(mlm_logits).transpose(1, 2), labels, reduction="none")
        weights = (positions != 0).to(ce.dtype)  # (B, P); position 0 is [CLS], i.e. padding
        mlm_loss = (ce * weights).sum() / (weights.sum() + MLM_DENOMINATOR_EPS)
        nsp_labels = batch["next_sentence_labels"].long().reshape(-1)
        nsp_loss = F.cross_entropy(_at_least_f32(nsp_logits), nsp_labels, reduction="mean")
        return {
            "mlm_logits": mlm_logits,
            "nsp_logits": nsp_logits,
            "mlm_loss": mlm_loss,
            "nsp_loss": nsp_loss,
            "loss": mlm_loss + nsp_loss,
        }


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    # Losses of bf16/fp16 logits in float32; float64 models (gradient checks) stay float64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def build(cfg: BertConfig, *, fused: bool = False) -> BertPretraining:
    """A float32 BertPretraining with uninitialised weights; the workload loads them.

    Built on the meta device, so no time goes into random initialisation that
    ``load_canonical`` would overwrite.
    """
    with torch.device("meta"):
        model = BertPretraining(cfg, fused=fused)
    return model.to_empty(device="cpu").to(torch.float32)

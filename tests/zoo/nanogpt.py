"""A decoder in nanoGPT's architecture (karpathy/nanoGPT ``model.py``) with its recipe
(``train.py`` and ``config/train_shakespeare_char.py``), written for the zoo.

Parameter names follow nanoGPT's (``transformer.wte``, ``transformer.h.0.attn.c_attn``, ...);
``lm_head.weight`` is ``transformer.wte.weight`` (weight tying). The recipe: AdamW betas
(0.9, 0.99), weight decay 0.1 on tensors of two or more dimensions only, ``fused=False``
(CPU), ``get_lr``'s linear warm-up then cosine decay to ``min_lr`` (as a ``LambdaLR`` of the
ratio to the peak), ``grad_clip = 1.0``, dropout 0.2.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import Entry
from .recipes import STEPS, nanogpt_param_groups, tokens


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    block_size: int = 16  # T, the longest context
    vocab_size: int = 65  # V, shakespeare_char's characters
    n_layer: int = 2
    n_head: int = 4  # N
    n_embd: int = 32  # D
    dropout: float = 0.2
    bias: bool = False  # Linear and LayerNorm biases


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        # (B, N, T, H); attention dropout only while training, as nanoGPT's flash path
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx, targets):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


# train_shakespeare_char.py's schedule, shortened to the zoo's STEPS
LEARNING_RATE, MIN_LR = 1e-3, 1e-4
WARMUP_ITERS, LR_DECAY_ITERS = 2, STEPS


def get_lr(it: int) -> float:
    """nanoGPT's learning rate at iteration ``it``: linear warm-up, cosine decay, floor."""
    if it < WARMUP_ITERS:
        return LEARNING_RATE * (it + 1) / (WARMUP_ITERS + 1)
    if it > LR_DECAY_ITERS:
        return MIN_LR
    ratio = (it - WARMUP_ITERS) / (LR_DECAY_ITERS - WARMUP_ITERS)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return MIN_LR + coeff * (LEARNING_RATE - MIN_LR)


def batch(seed: int) -> dict[str, np.ndarray]:
    """``x`` (B, T) and ``y``, the next characters (get_batch's layout)."""
    ids = tokens(seed, GPTConfig.vocab_size, batch=4, seq=GPTConfig.block_size + 1)
    return {"x": ids[:, :-1].copy(), "y": ids[:, 1:].copy()}


ENTRIES = [
    Entry(
        "nanogpt",
        GPT,
        batch,
        lambda model, b: model(b["x"], b["y"]),
        lambda m: torch.optim.AdamW(
            nanogpt_param_groups(m, 0.1), lr=LEARNING_RATE, betas=(0.9, 0.99), fused=False
        ),
        # train.py sets param_group["lr"] = get_lr(iter_num) each iteration; as a LambdaLR
        # that is the ratio to the peak rate
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda it: get_lr(it) / LEARNING_RATE),
        "karpathy/nanoGPT train.py + config/train_shakespeare_char.py",
        clip_grad_norm=1.0,
        tied=(("transformer.wte.weight", "lm_head.weight"),),
    ),
]

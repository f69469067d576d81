"""``torch.nn`` sequence models as the PyTorch examples and tutorials write them.

The LSTM and GRU language models follow pytorch/examples ``word_language_model`` (``RNNModel``:
embedding, dropout, a multi-layer ``nn.LSTM``/``nn.GRU`` with dropout between layers, a linear
decoder that ``--tied`` ties to the embedding; inputs seq-first (T, B)). Its ``main.py`` steps
plain SGD at lr 20 with ``clip_grad_norm_(0.25)`` and divides the rate by 4 when the validation
loss stops improving, once per epoch: a 10-step run stays at 20, so no scheduler here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler

from . import Entry
from .recipes import cross_entropy, tokens

V = 64  # vocabulary
T = 10  # sequence length


class RNNModel(nn.Module):
    """Embedding -> dropout -> LSTM/GRU (2 layers, dropout between them) -> dropout -> decoder."""

    def __init__(
        self, kind: str, d: int = 32, layers: int = 2, dropout: float = 0.2, tied: bool = False
    ):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(V, d)
        self.rnn = getattr(nn, kind)(d, d, layers, dropout=dropout)
        self.decoder = nn.Linear(d, V)
        if tied:
            self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x):  # x: (T, B) token ids
        y, _ = self.rnn(self.drop(self.encoder(x)))  # (T, B, D), zero initial state
        return self.decoder(self.drop(y))  # (T, B, V)


def lm_batch(seed: int) -> dict[str, np.ndarray]:
    """``data`` and ``target`` (T, B): the example's batchify layout, target one token ahead."""
    ids = tokens(seed, V, batch=4, seq=T + 1).T  # (T + 1, B)
    return {"data": np.ascontiguousarray(ids[:-1]), "target": np.ascontiguousarray(ids[1:])}


def lm_loss(model, batch):
    # the example's log_softmax + NLLLoss
    logp = F.log_softmax(model(batch["data"]), dim=-1)
    return F.nll_loss(logp.reshape(-1, V), batch["target"].reshape(-1))


class EncoderClassifier(nn.Module):
    """Token + learned position embeddings, ``nn.TransformerEncoder``, masked mean, linear."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(V, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=64, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):  # ids: (B, T), 0 = padding
        pad = ids == 0
        x = self.encoder(self.embed(ids) + self.pos, src_key_padding_mask=pad)  # (B, T, D)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1))  # (B, classes)


def classify_batch(seed: int) -> dict[str, np.ndarray]:
    ids = tokens(seed, V, batch=4, seq=T)
    ids[0, -3:] = 0
    labels = np.random.default_rng(seed + 1000).integers(0, 4, (4,))
    return {"ids": ids, "labels": labels}


def classify_loss(model, batch):
    return cross_entropy(model(batch["ids"]), batch["labels"])


ENTRIES = [
    Entry(
        "lstm-lm",
        lambda: RNNModel("LSTM"),
        lm_batch,
        lm_loss,
        lambda m: torch.optim.SGD(m.parameters(), lr=20.0),
        None,
        "pytorch/examples word_language_model main.py (--model LSTM --dropout 0.2)",
        clip_grad_norm=0.25,
    ),
    Entry(
        "gru-lm-tied",
        lambda: RNNModel("GRU", tied=True),
        lm_batch,
        lm_loss,
        # lr 20 makes this 32-wide tied model oscillate (the tied matrix takes both updates);
        # 10 trains it
        lambda m: torch.optim.SGD(m.parameters(), lr=10.0),
        None,
        "pytorch/examples word_language_model main.py (--model GRU --tied)",
        clip_grad_norm=0.25,
        tied=(("encoder.weight", "decoder.weight"),),
    ),
    Entry(
        "transformer-encoder-cls",
        EncoderClassifier,
        classify_batch,
        classify_loss,
        # PyTorch tutorial "Language Modeling with nn.Transformer": SGD lr 5.0, StepLR(1.0,
        # gamma=0.95) each epoch (here each step), clip_grad_norm_ 0.5
        lambda m: torch.optim.SGD(m.parameters(), lr=5.0),
        lambda o: lr_scheduler.StepLR(o, 1, gamma=0.95),
        "pytorch.org/tutorials/beginner/transformer_tutorial.html",
        clip_grad_norm=0.5,
    ),
]

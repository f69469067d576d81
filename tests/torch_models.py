"""Small user-style PyTorch models for the migration tests and chapter (imported as
``torch_models``): the kinds of models people bring to a port."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 32, classes: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CNN(nn.Module):
    """Conv-BatchNorm-ReLU-pool, dropout, linear head."""

    def __init__(self, classes: int = 5):
        super().__init__()
        # No bias before BatchNorm: its exact gradient is zero (BN removes the mean), and Adam
        # turns the round-off that stands in for it into steps that differ between frameworks.
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))  # (B, 8, 4, 4)
        return self.head(self.dropout(x.flatten(1)))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016) with a strided 1x1 projection shortcut."""

    def __init__(self, c_in: int = 4, c_out: int = 8, stride: int = 2, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
        )
        self.head = nn.Linear(c_out, classes)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))
        return self.head(y.mean(dim=(2, 3)))


class Encoder(nn.Module):
    """Token embedding, one Transformer encoder layer with a padding mask, mean pooling."""

    def __init__(self, vocab: int = 20, d: int = 16, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True
        )
        self.head = nn.Linear(d, classes)

    def forward(self, tokens, mask):
        h = self.layer(self.embed(tokens), src_key_padding_mask=mask == 0)  # (B, T, D)
        return self.head((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


class Custom(nn.Module):
    """A custom forward: gather by index, einsum scores, masking, a learned temperature."""

    def __init__(self, vocab: int = 20, d: int = 8, classes: int = 5):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, d) * 0.5)
        self.query = nn.Parameter(torch.randn(d) * 0.5)
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.out = nn.Linear(d, classes)

    def forward(self, tokens, mask):
        x = self.table[tokens]  # (B, T, D)
        scores = torch.einsum("btd,d->bt", x, self.query) / self.temperature
        scores = scores.masked_fill(mask == 0, float("-inf"))
        weights = scores.softmax(-1)
        return self.out(torch.einsum("bt,btd->bd", weights, x)) + x[:, 0, :1]


def image_batch(seed: int, channels: int = 3, size: int = 8, batch: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, channels, size, size)).astype(np.float32),
        "y": rng.integers(0, 5, batch).astype(np.int64),
    }


def vector_batch(seed: int, d_in: int = 12, batch: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, d_in)).astype(np.float32),
        "y": rng.integers(0, 5, batch).astype(np.int64),
    }


def token_batch(seed: int, vocab: int = 20, t: int = 7, batch: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, t), np.int64)
    mask[1, -2:] = 0  # padding at the end of the second sequence
    return {
        "tokens": rng.integers(0, vocab, (batch, t)).astype(np.int64),
        "mask": mask,
        "y": rng.integers(0, 5, batch).astype(np.int64),
    }


def classify(model, batch):
    """Cross-entropy of a model taking ``x``."""
    return F.cross_entropy(model(batch["x"]), batch["y"])


def classify_tokens(model, batch):
    """Cross-entropy of a model taking ``tokens`` and ``mask``."""
    return F.cross_entropy(model(batch["tokens"], batch["mask"]), batch["y"])

"""The toy model in PyTorch: one of every foundational layer (see ``workloads/toy/__init__.py``).

Not an MLPerf benchmark. Layer references: BatchNorm (https://arxiv.org/abs/1502.03167),
GroupNorm (https://arxiv.org/abs/1803.08494), LayerNorm (https://arxiv.org/abs/1607.06450),
exact GELU (https://arxiv.org/abs/1606.08415). Attribute names are the canonical names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlperf_tutor.workloads.toy.config import ToyConfig


class ToyModel(nn.Module):
    """Image branch (conv, BatchNorm, conv, GroupNorm) + token branch (embedding, Conv1d), then
    an MLP head with LayerNorm and exact GELU.

    Args:
        cfg: the toy config; every eps and momentum comes from it (no framework defaults).
    """

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        c, d = cfg.channels, cfg.embed_dim
        self.conv1 = nn.Conv2d(cfg.in_channels, c, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(
            c, eps=cfg.norm_eps, momentum=cfg.bn_momentum, affine=True, track_running_stats=True
        )
        self.conv2 = nn.Conv2d(c, c, 3, stride=2, padding=1, bias=True)
        self.gn = nn.GroupNorm(cfg.groups, c, eps=cfg.norm_eps, affine=True)
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.conv1d = nn.Conv1d(d, d, 3, stride=1, padding=1, bias=True)
        self.fc1 = nn.Linear(c + d, cfg.hidden, bias=True)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, elementwise_affine=True)
        self.head = nn.Linear(cfg.hidden, cfg.num_classes, bias=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The image follows the model's dtype, so a float64 copy takes the same float32 batch.
        image = batch["image"].to(self.conv1.weight.dtype)  # (B, C_in, H, W)
        x = F.relu(self.bn(self.conv1(image)))  # (B, C, H, W)
        x = F.relu(self.gn(self.conv2(x)))  # (B, C, H/2, W/2)
        x = x.mean(dim=(2, 3))  # (B, C)
        t = self.embed(batch["tokens"].long())  # (B, T, D)
        t = F.relu(self.conv1d(t.transpose(1, 2)))  # (B, D, T)
        t = t.mean(dim=2)  # (B, D)
        h = F.gelu(self.ln(self.fc1(torch.cat([x, t], dim=1))), approximate="none")  # (B, hidden)
        logits = self.head(h)  # (B, num_classes)
        loss = F.cross_entropy(logits, batch["labels"].long(), reduction="mean")
        return {"logits": logits, "loss": loss}


def build(cfg: ToyConfig) -> ToyModel:
    """A float32 ToyModel; the workload loads its weights afterwards (``load_canonical``)."""
    return ToyModel(cfg).to(torch.float32)

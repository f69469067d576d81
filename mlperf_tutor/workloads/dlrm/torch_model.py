"""DLRM with a DCNv2 interaction in PyTorch.

References: Naumov et al. 2019, DLRM (https://arxiv.org/abs/1906.00091); Wang et al. 2021,
DCN V2 (https://arxiv.org/abs/2008.13535); mlcommons/training
``recommendation_v2/torchrec_dlrm``. The forward is specified in ``workloads/dlrm/__init__.py``;
attribute names are the canonical names.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlperf_tutor.workloads.dlrm.config import DlrmConfig


class Mlp(nn.Module):
    """Linear layers with a ReLU after each (after the last too only if ``relu_last``).

    Args:
        n_in: input width.
        sizes: output width of each layer.
        relu_last: ReLU after the last layer as well (the bottom MLP; not the top one).
    """

    def __init__(self, n_in: int, sizes: Sequence[int], *, relu_last: bool):
        super().__init__()
        widths = [n_in, *sizes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.relu_last = relu_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for j, layer in enumerate(self.layers):
            x = layer(x)
            if self.relu_last or j < last:
                x = F.relu(x)
        return x


class CrossLayer(nn.Module):
    """One low-rank DCNv2 cross layer: ``x0 * w(v(x)) + x``.

    Args:
        dim: D, the interaction width.
        rank: R, the rank of the cross weight ``w @ v``.
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.v = nn.Linear(dim, rank, bias=False)
        self.w = nn.Linear(rank, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.w(self.v(x)) + x  # (B, D)


class CrossNet(nn.Module):
    """The DCNv2 interaction: ``num_layers`` cross layers, each crossing with the input x0.

    Args:
        dim: D, the interaction width.
        rank: R of every cross layer.
        num_layers: number of cross layers.
    """

    def __init__(self, dim: int, rank: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(dim, rank) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class Dlrm(nn.Module):
    """DLRM-DCNv2: bottom MLP on the dense features, one summed embedding bag per categorical
    feature, a DCNv2 cross network over their concatenation, and a top MLP to one logit.

    Takes a batch dict with ``dense`` (B, 13), ``sparse`` (B, H) (feature f's bag is its
    ``multi_hot_sizes[f]`` consecutive columns) and optional ``labels`` (B,); returns
    ``{"logits": (B,)}`` plus ``"loss"``, the mean binary cross-entropy, when labels are given.

    Args:
        cfg: the DLRM config.
    """

    def __init__(self, cfg: DlrmConfig):
        super().__init__()
        self.multi_hot_sizes = tuple(cfg.multi_hot_sizes)
        self.bottom_mlp = Mlp(cfg.num_dense, cfg.bottom_mlp, relu_last=True)
        # Dense gradients (sparse=False): every optimizer and the adapter's gradient export take
        # them; untouched rows get exact zeros, which Adagrad (accumulator 0) leaves unchanged.
        self.embedding_bags = nn.ModuleList(
            nn.EmbeddingBag(rows, cfg.embedding_dim, mode="sum") for rows in cfg.table_sizes
        )
        self.interaction = CrossNet(cfg.interaction_dim, cfg.cross_rank, cfg.cross_layers)
        self.top_mlp = Mlp(cfg.interaction_dim, cfg.top_mlp, relu_last=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dense = batch["dense"].to(self.bottom_mlp.layers[0].weight.dtype)  # (B, 13)
        sparse = batch["sparse"]  # (B, H); int32 and int64 both index EmbeddingBag
        if sparse.shape[1] != sum(self.multi_hot_sizes):
            raise ValueError(
                f"sparse has {sparse.shape[1]} columns; the config's multi_hot_sizes sum to "
                f"{sum(self.multi_hot_sizes)}"
            )
        bags = torch.split(sparse, self.multi_hot_sizes, dim=1)  # F views of (B, hot_f)
        pooled = [table(bag) for table, bag in zip(self.embedding_bags, bags, strict=True)]
        x0 = torch.cat([self.bottom_mlp(dense), *pooled], dim=1)  # (B, (F + 1) E)
        logits = self.top_mlp(self.interaction(x0)).squeeze(1)  # (B,)
        out = {"logits": logits}
        if batch.get("labels") is not None:
            # In float32 at least (bf16 logits lose precision); float64 models stay float64.
            dtype = torch.promote_types(logits.dtype, torch.float32)
            out["loss"] = F.binary_cross_entropy_with_logits(
                logits.to(dtype), batch["labels"].to(dtype)
            )
        return out


def build(cfg: DlrmConfig) -> Dlrm:
    """A float32 Dlrm with uninitialised weights; the workload loads them.

    Built on the meta device, so no time goes into random initialisation that
    ``load_canonical`` would overwrite (the MLPerf tables hold 200M rows).
    """
    with torch.device("meta"):
        model = Dlrm(cfg)
    return model.to_empty(device="cpu").to(torch.float32)

"""Config of MLPerf Training DLRM-DCNv2 (``dlrm_dcnv2``), framework-free.

Architecture and data sizes: mlcommons/training ``recommendation_v2/torchrec_dlrm`` README
(embedding dim 128, bottom MLP 512-256-128, top MLP 1024-1024-512-256-1, DCNv2 interaction with
3 low-rank (512) cross layers; the 26 table sizes and multi-hot sizes of the synthetic multi-hot
Criteo 1TB dataset). Optimizer: the v4.0 rules' Adagrad (no decay, no warmup, initial
accumulator 0, eps 1e-8) at the RCPs' lr 0.004 (global batch 32768-102400).
"""

from __future__ import annotations

import dataclasses

from mlperf_tutor.core.config import LAYERS, Config, ConfigError

TABLE_SIZES = (
    40000000,
    39060,
    17295,
    7424,
    20265,
    3,
    7122,
    1543,
    63,
    40000000,
    3067956,
    405282,
    10,
    2209,
    11938,
    155,
    4,
    976,
    14,
    40000000,
    40000000,
    40000000,
    590152,
    12973,
    108,
    36,
)
MULTI_HOT_SIZES = (
    3,
    2,
    1,
    2,
    6,
    1,
    1,
    1,
    1,
    7,
    3,
    8,
    1,
    6,
    9,
    5,
    1,
    1,
    1,
    12,
    100,
    27,
    10,
    3,
    1,
    1,
)


@dataclasses.dataclass(frozen=True)
class DlrmConfig(Config):
    """Hyperparameters of DLRM with a DCNv2 interaction (defaults: the ``mlperf`` preset)."""

    num_dense: int = 13  # dense (integer) features of Criteo
    table_sizes: tuple[int, ...] = TABLE_SIZES  # rows of each categorical feature's table
    multi_hot_sizes: tuple[int, ...] = MULTI_HOT_SIZES  # indices per sample and feature
    embedding_dim: int = 128  # E
    bottom_mlp: tuple[int, ...] = (512, 256, 128)  # ReLU after every layer; last = E
    top_mlp: tuple[int, ...] = (1024, 1024, 512, 256, 1)  # ReLU after all but the last
    cross_layers: int = 3  # DCNv2 low-rank cross layers
    cross_rank: int = 512  # their rank R
    # Adagrad (v4.0 rules): no lr decay, no warmup, initial accumulator 0, eps 1e-8.
    lr: float = 0.004
    eps: float = 1e-8
    global_batch_size: int = 65536
    # Evaluation: ROC AUC on held-out samples (MLPerf: 89,137,319 samples of day 23, every
    # 0.05 epoch; target 0.80275).
    eval_samples: int = 89137319
    eval_every_samples: int = 209759884  # 0.05 of the 4,195,197,692 training samples

    PRESETS = {
        # Trains on 2 CPU cores in seconds: small tables, the reference's multi-hot sizes. At
        # lr 0.005 (near the reference's 0.004) ten Adagrad steps stay within 4e-5 across
        # frameworks; at 0.01 the steps amplify float32 round-off to 1.2e-4 (measured).
        "tiny": {
            "table_sizes": (
                97,
                39,
                17,
                74,
                20,
                3,
                71,
                15,
                63,
                101,
                30,
                40,
                10,
                22,
                19,
                15,
                4,
                97,
                14,
                89,
                83,
                79,
                59,
                12,
                10,
                36,
            ),
            "embedding_dim": 8,
            "bottom_mlp": (32, 16, 8),
            "top_mlp": (64, 32, 1),
            "cross_rank": 8,
            "lr": 0.005,
            "global_batch_size": 64,
            "eval_samples": 2048,
            "eval_every_samples": 640,
        },
        # One accelerator: every table capped at 1M rows (2.9 GB of fp32 embeddings).
        "small": {
            "table_sizes": tuple(min(size, 1_000_000) for size in TABLE_SIZES),
            "global_batch_size": 16384,
            "eval_samples": 131072,
            "eval_every_samples": 1638400,
        },
        "mlperf": {},
    }

    # Fields outside the defaults (ints and tuple entries >= 1, floats > 0; see
    # mlperf_tutor.core.config).
    RANGES = {"cross_layers": LAYERS}

    def check(self):
        if len(self.table_sizes) != len(self.multi_hot_sizes):
            raise ConfigError(
                f"{len(self.table_sizes)} table sizes but {len(self.multi_hot_sizes)} multi-hot "
                "sizes; give one of each per categorical feature",
                "multi_hot_sizes",
            )
        if self.bottom_mlp[-1] != self.embedding_dim:
            raise ConfigError(
                f"the bottom MLP must end at embedding_dim ({self.embedding_dim}), got "
                f"{self.bottom_mlp[-1]}",
                "bottom_mlp",
            )
        if self.top_mlp[-1] != 1:
            raise ConfigError(
                f"the top MLP must end in one logit, got {self.top_mlp[-1]}", "top_mlp"
            )

    @property
    def num_tables(self) -> int:
        return len(self.table_sizes)

    @property
    def interaction_dim(self) -> int:
        """Width of the DCNv2 input: the bottom MLP's output and every pooled embedding."""
        return (self.num_tables + 1) * self.embedding_dim

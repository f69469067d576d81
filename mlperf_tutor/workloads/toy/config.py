"""Config of the toy workload (framework-free)."""

from __future__ import annotations

import dataclasses

from mlperf_tutor.core.config import NON_NEGATIVE, Config, ConfigError, Range


@dataclasses.dataclass(frozen=True)
class ToyConfig(Config):
    """A small two-branch classifier that holds one of every foundational layer.

    Not an MLPerf benchmark: it exercises the machinery (layout rules, optimizers, conversion,
    parity) that every workload builds on, and it is what the foundation chapters run.
    """

    in_channels: int = 3  # image channels (NCHW in the batch, like PyTorch)
    image_size: int = 8  # H = W
    channels: int = 8  # conv1/conv2 output channels
    groups: int = 4  # GroupNorm groups (divides channels)
    vocab_size: int = 32  # token vocabulary of the sequence branch
    seq_len: int = 6  # tokens per example
    embed_dim: int = 8  # D of the embedding and the Conv1d
    hidden: int = 16  # fc1 width
    num_classes: int = 5
    norm_eps: float = 1e-5  # LayerNorm, GroupNorm and BatchNorm epsilon (passed explicitly)
    bn_momentum: float = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch
    init_std: float = 0.2  # normal std of conv/linear/embedding weights
    lr: float = 1e-2
    weight_decay: float = 0.01
    warmup_steps: int = 2
    total_steps: int = 20

    PRESETS = {
        "tiny": {},
        "small": {
            "image_size": 32,
            "channels": 32,
            "groups": 8,
            "vocab_size": 1000,
            "seq_len": 64,
            "embed_dim": 64,
            "hidden": 256,
            "num_classes": 10,
        },
    }

    # Fields outside the defaults (ints >= 1, floats > 0; see mlperf_tutor.core.config).
    RANGES = {
        "bn_momentum": Range(0, 1),
        "weight_decay": NON_NEGATIVE,
        "warmup_steps": NON_NEGATIVE,
    }

    def check(self):
        if self.channels % self.groups:
            raise ConfigError(
                f"channels ({self.channels}) must be divisible by groups ({self.groups})", "groups"
            )

"""The toy workload: one of every foundational layer, in PyTorch, JAX and TensorFlow.

Forward (same in all three frameworks; shapes for batch B)::

    image (B, C, H, W) --conv1 3x3 s1 p1, no bias--> bn (BatchNorm, train: batch stats) --relu-->
        --conv2 3x3 s2 p1--> gn (GroupNorm) --relu--> mean over H, W        -> x (B, channels)
    tokens (B, T) --embed--> (B, T, D) --conv1d k3 p1--> relu --> mean over T -> t (B, D)
    concat(x, t) --fc1--> ln (LayerNorm) --gelu (exact)--> head -> logits (B, num_classes)
    loss = mean cross-entropy(logits, labels)

conv1 has no bias: BatchNorm would cancel it, leaving a gradient of pure round-off that Adam would
turn into full-size steps (a classic source of false parity failures).
JAX and TensorFlow take the NCHW image and transpose it to NHWC at the model's entry.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mlperf_tutor.core.batch import BatchCheck, Ids
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec
from mlperf_tutor.workloads.base import Workload, endless_batches, epoch_rng, new_data_directory
from mlperf_tutor.workloads.toy.config import ToyConfig


def canonical_shapes(cfg: ToyConfig) -> dict[str, tuple[int, ...]]:
    """Canonical (PyTorch ``state_dict``) name -> shape, parameters then buffers."""
    c, d = cfg.channels, cfg.embed_dim
    return {
        "conv1.weight": (c, cfg.in_channels, 3, 3),
        "bn.weight": (c,),
        "bn.bias": (c,),
        "bn.running_mean": (c,),
        "bn.running_var": (c,),
        "conv2.weight": (c, c, 3, 3),
        "conv2.bias": (c,),
        "gn.weight": (c,),
        "gn.bias": (c,),
        "embed.weight": (cfg.vocab_size, d),
        "conv1d.weight": (d, d, 3),
        "conv1d.bias": (d,),
        "fc1.weight": (cfg.hidden, c + d),
        "fc1.bias": (cfg.hidden,),
        "ln.weight": (cfg.hidden,),
        "ln.bias": (cfg.hidden,),
        "head.weight": (cfg.num_classes, cfg.hidden),
        "head.bias": (cfg.num_classes,),
    }


BUFFERS = ("bn.running_mean", "bn.running_var")


class ToyWorkload(Workload):
    name = "toy"
    description = (
        "Foundation demo model (Conv2d, BatchNorm, GroupNorm, Embedding, Conv1d, "
        "Linear, LayerNorm); not an MLPerf benchmark"
    )
    config_class = ToyConfig
    package = "mlperf_tutor.workloads.toy"

    def canonical_shapes(self, cfg: ToyConfig) -> dict[str, tuple[int, ...]]:
        return canonical_shapes(cfg)

    def param_count(self, cfg: ToyConfig) -> int:
        """Parameters: the canonical entries without BatchNorm's running statistics."""
        shapes = canonical_shapes(cfg)
        return sum(math.prod(s) for k, s in shapes.items() if k not in BUFFERS)

    def synthetic_batch(self, cfg: ToyConfig, batch_size: int = 2, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        s = cfg.image_size
        return {
            "image": rng.standard_normal((batch_size, cfg.in_channels, s, s), dtype=np.float32),
            "tokens": rng.integers(0, cfg.vocab_size, (batch_size, cfg.seq_len), dtype=np.int32),
            "labels": rng.integers(0, cfg.num_classes, (batch_size,), dtype=np.int32),
        }

    def batch_check(self, cfg: ToyConfig) -> BatchCheck:
        """Tokens below ``vocab_size``, labels below ``num_classes``."""
        return BatchCheck(
            ids=(
                Ids("tokens", cfg.vocab_size, "cfg.vocab_size"),
                Ids("labels", cfg.num_classes, "cfg.num_classes"),
            )
        )

    def write_sample_data(
        self, cfg: ToyConfig, directory: str | os.PathLike, *, samples: int = 64, seed: int = 0
    ) -> Path:
        """:meth:`synthetic_batch` rows as ``directory/{image,tokens,labels}.npy`` (the toy's
        own format, see :mod:`.data`: no MLPerf benchmark has one); returns ``directory``."""
        from mlperf_tutor.workloads.toy.data import write_arrays

        directory = new_data_directory(directory, samples)
        return write_arrays(directory, self.synthetic_batch(cfg, samples, seed))

    def data_batches(
        self,
        cfg: ToyConfig,
        path: str | os.PathLike,
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of the ``.npy`` files in the directory ``path`` (:class:`~.data.ToyArrays`);
        epoch ``e`` is a permutation of the rows seeded by ``(seed, e)``."""
        from mlperf_tutor.workloads.toy.data import ToyArrays

        arrays = ToyArrays(path, cfg)

        def epoch(e: int, first: int) -> Iterator[dict[str, np.ndarray]]:
            order = epoch_rng(seed, e).permutation(len(arrays))
            for j in range(first, len(arrays) // batch_size):
                yield arrays.batch(order[j * batch_size : (j + 1) * batch_size])

        return endless_batches(path, len(arrays), batch_size, seed, start, epoch)

    def init_weight(
        self, cfg: ToyConfig, name: str, shape: tuple[int, ...], rng: np.random.Generator
    ) -> np.ndarray:
        # Norm weights and biases are random too (not 1 and 0) so a layout mistake shows up.
        if name.endswith("running_mean"):
            return 0.1 * rng.standard_normal(shape)
        if name.endswith("running_var"):
            return rng.uniform(0.5, 1.5, shape)
        if name.split(".")[0] in ("bn", "gn", "ln") and name.endswith("weight"):
            return 1.0 + 0.1 * rng.standard_normal(shape)
        if name.endswith("bias"):
            return 0.1 * rng.standard_normal(shape)
        return cfg.init_std * rng.standard_normal(shape)

    def optimizer(self, cfg: ToyConfig) -> tuple[OptimizerSpec, ScheduleSpec]:
        spec = OptimizerSpec(
            "adamw",
            weight_decay=cfg.weight_decay,
            no_decay=(r"bias$", r"^(bn|gn|ln)\."),
            clip_norm=1.0,
        )
        schedule = ScheduleSpec(
            cfg.lr,
            warmup_steps=cfg.warmup_steps,
            decay="cosine",
            total_steps=cfg.total_steps,
            end_lr=0.1 * cfg.lr,
        )
        return spec, schedule


WORKLOAD = ToyWorkload()

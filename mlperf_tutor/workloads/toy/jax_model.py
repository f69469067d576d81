"""The toy model in Flax NNX: one of every foundational layer (see ``workloads/toy/__init__.py``).

Not an MLPerf benchmark. Layer references: BatchNorm (https://arxiv.org/abs/1502.03167),
GroupNorm (https://arxiv.org/abs/1803.08494), LayerNorm (https://arxiv.org/abs/1607.06450),
exact GELU (https://arxiv.org/abs/1606.08415). Attribute names equal the PyTorch model's; the
adapter's layout rules give the canonical names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mlperf_tutor.frameworks.jax import init_empty
from mlperf_tutor.layers.jax.norms import BatchNorm
from mlperf_tutor.workloads.toy.config import ToyConfig

PAD1 = ((1, 1),)  # explicit: "SAME" pads stride-2 convolutions differently from PyTorch
PAD2 = ((1, 1), (1, 1))


class ToyModel(nnx.Module):
    """Image branch (conv, BatchNorm, conv, GroupNorm) + token branch (embedding, Conv1d), then
    an MLP head with LayerNorm and exact GELU.

    Args:
        cfg: the toy config; every eps and momentum comes from it (no framework defaults).
        rngs: initialisers' keys (the weights are replaced by ``load_canonical``).
    """

    def __init__(self, cfg: ToyConfig, *, rngs: nnx.Rngs):
        c, d, eps = cfg.channels, cfg.embed_dim, cfg.norm_eps
        self.conv1 = nnx.Conv(cfg.in_channels, c, (3, 3), padding=PAD2, use_bias=False, rngs=rngs)
        self.bn = BatchNorm(c, momentum=cfg.bn_momentum, epsilon=eps)
        self.conv2 = nnx.Conv(c, c, (3, 3), strides=2, padding=PAD2, rngs=rngs)
        # Two-pass variance, as PyTorch computes it (Flax's default is E[x^2] - E[x]^2).
        self.gn = nnx.GroupNorm(
            c, num_groups=cfg.groups, epsilon=eps, use_fast_variance=False, rngs=rngs
        )
        self.embed = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
        self.conv1d = nnx.Conv(d, d, (3,), padding=PAD1, rngs=rngs)
        self.fc1 = nnx.Linear(c + d, cfg.hidden, rngs=rngs)
        self.ln = nnx.LayerNorm(cfg.hidden, epsilon=eps, use_fast_variance=False, rngs=rngs)
        self.head = nnx.Linear(cfg.hidden, cfg.num_classes, rngs=rngs)

    def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        image = batch["image"].astype(self.conv1.kernel.dtype)  # (B, C_in, H, W)
        x = jnp.transpose(image, (0, 2, 3, 1))  # (B, H, W, C_in)
        x = nnx.relu(self.bn(self.conv1(x)))  # (B, H, W, C)
        x = nnx.relu(self.gn(self.conv2(x)))  # (B, H/2, W/2, C)
        x = x.mean(axis=(1, 2))  # (B, C)
        t = nnx.relu(self.conv1d(self.embed(batch["tokens"])))  # (B, T, D)
        t = t.mean(axis=1)  # (B, D)
        h = nnx.gelu(self.ln(self.fc1(jnp.concatenate([x, t], axis=1))), approximate=False)
        logits = self.head(h)  # (B, num_classes)
        labels = batch["labels"].astype(jnp.int32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return {"logits": logits, "loss": loss}


def build(cfg: ToyConfig) -> ToyModel:
    """A float32 ToyModel with zero weights; the workload loads them (``load_canonical``)."""
    return init_empty(lambda: ToyModel(cfg, rngs=nnx.Rngs(0)))

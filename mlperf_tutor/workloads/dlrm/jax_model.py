"""DLRM with a DCNv2 interaction in Flax NNX.

References: Naumov et al. 2019 (DLRM, https://arxiv.org/abs/1906.00091); Wang et al. 2021
(DCN V2, https://arxiv.org/abs/2008.13535); mlcommons/training
``recommendation_v2/torchrec_dlrm``. The forward is specified in ``workloads/dlrm/__init__.py``;
attribute names equal the PyTorch and Keras models', and the adapter's layout rules give the
canonical names. Letters: B batch, H multi-hot columns, E embedding dim, F tables,
D = (F + 1) E the interaction width, R the cross rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mlperf_tutor.frameworks.jax import init_empty
from mlperf_tutor.workloads.dlrm.config import DlrmConfig
from mlperf_tutor.workloads.dlrm.data import bag_offsets


class Mlp(nnx.Module):
    """Linear layers with a ReLU after each (after the last only when ``relu_last``).

    Args:
        n_in: input width.
        sizes: output width of each layer.
        relu_last: ReLU after the last layer too (the bottom MLP) or not (the top MLP).
        rngs: the initialisers' keys.
    """

    def __init__(self, n_in: int, sizes, *, relu_last: bool, rngs: nnx.Rngs):
        self.relu_last = relu_last
        widths = (n_in, *sizes)
        self.layers = nnx.List(
            nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for j, layer in enumerate(self.layers):
            x = layer(x)
            if self.relu_last or j < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class CrossLayer(nnx.Module):
    """One low-rank DCNv2 cross layer: ``x0 * w(v(x)) + x``.

    Args:
        d: interaction width D.
        rank: the low rank R (``v``: D -> R without bias, ``w``: R -> D with bias).
        rngs: the initialisers' keys.
    """

    def __init__(self, d: int, rank: int, *, rngs: nnx.Rngs):
        self.v = nnx.Linear(d, rank, use_bias=False, rngs=rngs)
        self.w = nnx.Linear(rank, d, rngs=rngs)

    def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
        return x0 * self.w(self.v(x)) + x  # (B, D)


class CrossNet(nnx.Module):
    """The DCNv2 interaction: ``num_layers`` cross layers on the concatenated features.

    Args:
        d: interaction width D.
        rank: cross rank R.
        num_layers: how many cross layers.
        rngs: the initialisers' keys.
    """

    def __init__(self, d: int, rank: int, num_layers: int, *, rngs: nnx.Rngs):
        self.layers = nnx.List(CrossLayer(d, rank, rngs=rngs) for _ in range(num_layers))

    def __call__(self, x0: jax.Array) -> jax.Array:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


def bag_sum(table: jax.Array, bag: jax.Array) -> jax.Array:
    """Sum-pooled embedding bags: one gather of every index, then a sum over the bag axis.

    The gradient of the gather is a scatter-add, so rows no bag holds get an exact zero.

    Args:
        table: (rows, E) embedding table.
        bag: (B, hot) int row ids, a fixed-size bag per sample.

    Returns:
        (B, E) the sum of each sample's rows.
    """
    return jnp.take(table, bag, axis=0).sum(axis=1)  # (B, hot, E) -> (B, E)


class Dlrm(nnx.Module):
    """DLRM-DCNv2: bottom MLP on dense features, sum-pooled embedding bags, a DCNv2 cross
    network and a top MLP to one click logit.

    Args:
        cfg: the DLRM config.
        rngs: the initialisers' keys.
    """

    def __init__(self, cfg: DlrmConfig, *, rngs: nnx.Rngs):
        # Static column ranges of each feature's bag in ``sparse``.
        offsets = [int(o) for o in bag_offsets(cfg.multi_hot_sizes)]
        self.bags = tuple(zip(offsets[:-1], offsets[1:], strict=True))
        self.bottom_mlp = Mlp(cfg.num_dense, cfg.bottom_mlp, relu_last=True, rngs=rngs)
        self.embedding_bags = nnx.List(
            nnx.Embed(rows, cfg.embedding_dim, rngs=rngs) for rows in cfg.table_sizes
        )
        self.interaction = CrossNet(
            cfg.interaction_dim, cfg.cross_rank, cfg.cross_layers, rngs=rngs
        )
        self.top_mlp = Mlp(cfg.interaction_dim, cfg.top_mlp, relu_last=False, rngs=rngs)

    def pooled(self, sparse: jax.Array) -> list[jax.Array]:
        """Each feature's pooled bag, (B, E) per table, from ``sparse`` (B, H)."""
        # The table read directly: nnx.Embed's call casts its output to float32.
        return [
            bag_sum(embed.embedding[...], sparse[:, start:stop])
            for embed, (start, stop) in zip(self.embedding_bags, self.bags, strict=True)
        ]

    def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        # Dense features in the weights' dtype: Flax promotes, so float32 features would turn a
        # bf16 step (bf16 copies of the weights) back into float32 matmuls.
        dtype = self.bottom_mlp.layers[0].kernel.dtype
        dense = self.bottom_mlp(jnp.asarray(batch["dense"], dtype))  # (B, E)
        x0 = jnp.concatenate([dense, *self.pooled(batch["sparse"])], axis=1)  # (B, D)
        logits = self.top_mlp(self.interaction(x0))[:, 0]  # (B,)
        out = {"logits": logits}
        if "labels" in batch:
            acc = jnp.promote_types(logits.dtype, jnp.float32)  # float64 models stay float64
            bce = optax.sigmoid_binary_cross_entropy(
                logits.astype(acc), batch["labels"].astype(acc)
            )
            out["loss"] = jnp.mean(bce)
        return out


def build(cfg: DlrmConfig) -> Dlrm:
    """A float32 Dlrm with zero weights; the workload loads them (``load_canonical``).

    Args:
        cfg: the DLRM config.
    """
    return init_empty(lambda: Dlrm(cfg, rngs=nnx.Rngs(0)))

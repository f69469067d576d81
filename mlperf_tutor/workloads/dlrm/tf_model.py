"""DLRM with a DCNv2 interaction in Keras 3 / TensorFlow.

References: Naumov et al. 2019 (https://arxiv.org/abs/1906.00091); Wang et al. 2021, DCN V2
(https://arxiv.org/abs/2008.13535); mlcommons/training ``recommendation_v2/torchrec_dlrm``. The
forward is specified in ``workloads/dlrm/__init__.py``; attribute names (and Keras ``name=``) are
the canonical names.
"""

from __future__ import annotations

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mlperf_tutor.workloads.dlrm.config import DlrmConfig
from mlperf_tutor.workloads.dlrm.data import bag_offsets


def _dense(units: int, name: str, dtype, use_bias: bool = True) -> keras.layers.Dense:
    # Zeros: the weights come from load_canonical (the workload's init_canonical or a checkpoint).
    return keras.layers.Dense(
        units, use_bias=use_bias, kernel_initializer="zeros", name=name, dtype=dtype
    )


class Mlp(keras.layers.Layer):
    """Dense layers with a ReLU after each (after the last only with ``relu_last``).

    Args:
        sizes: output width of each layer.
        relu_last: ReLU after the last layer too (the bottom MLP) or not (the top MLP).
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(self, sizes, relu_last: bool, **kwargs):
        super().__init__(**kwargs)
        self.relu_last = relu_last
        self.layers = [_dense(n, f"layers.{j}", self.dtype_policy) for j, n in enumerate(sizes)]

    def call(self, x):
        for j, layer in enumerate(self.layers):
            x = layer(x)
            if self.relu_last or j < len(self.layers) - 1:
                x = ops.relu(x)
        return x


class CrossLayer(keras.layers.Layer):
    """One low-rank DCNv2 cross layer: ``x0 * w(v(x)) + x``.

    Args:
        dim: D, the width of ``x0`` and ``x``.
        rank: R, the low rank.
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(self, dim: int, rank: int, **kwargs):
        super().__init__(**kwargs)
        self.v = _dense(rank, "v", self.dtype_policy, use_bias=False)
        self.w = _dense(dim, "w", self.dtype_policy)

    def call(self, x0, x):
        return x0 * self.w(self.v(x)) + x  # (B, D)


class CrossNet(keras.layers.Layer):
    """The DCNv2 interaction: ``cfg.cross_layers`` cross layers, each fed ``x0``."""

    def __init__(self, cfg: DlrmConfig, **kwargs):
        super().__init__(**kwargs)
        d, r = cfg.interaction_dim, cfg.cross_rank
        self.layers = [
            CrossLayer(d, r, name=f"layers.{i}", dtype=self.dtype_policy)
            for i in range(cfg.cross_layers)
        ]

    def call(self, x0):
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


def _fixed_bags(bag) -> tf.SparseTensor:
    """(B, hot) ids as the SparseTensor ``embedding_lookup_sparse`` reads: row b holds bag b."""
    return tf.RaggedTensor.from_tensor(bag).to_sparse()


def embedding_bag(table: keras.layers.Embedding, bag):
    """Sum of ``table``'s rows over each bag (B, hot) -> (B, E), with sparse gradients.

    ``tf.nn.embedding_lookup_sparse`` gathers each distinct id once and sums with a segment sum
    (PyTorch's ``EmbeddingBag(mode="sum")``); its gradient reaches the table as
    ``tf.IndexedSlices`` over the ids of the batch.
    """
    # .value: the tf.Variable itself (the lookup reads its .device, which Keras' wrapper lacks).
    return tf.nn.embedding_lookup_sparse(
        table.embeddings.value, _fixed_bags(bag), None, combiner="sum"
    )


class EmbeddingBag(keras.layers.Embedding):
    """An embedding table whose call sums the rows of each bag: :func:`embedding_bag` of itself.

    An Embedding subclass, so the adapter's Embedding rule names its table ``weight``. Called as
    a layer, the table is read in its own dtype: Keras' Embedding does not autocast, so under a
    mixed policy (float32 tables, bfloat16 compute) the rows are summed in float32, as PyTorch's
    ``EmbeddingBag`` under autocast does, and only the (B, E) sums are cast by the model; read
    from the model's call instead, the whole table would be cast to bfloat16 each step and the
    bags summed in bfloat16.

    XLA has no kernel for the sparse lookup (``RaggedTensorToSparse``), so the layer says
    ``supports_jit = False``: Keras' ``model.jit_compile`` (and the TF Trainer) then leave the
    model to TensorFlow's executor.

    Shapes:
        bag: (B, hot) ids -> (B, E) in the table's dtype.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.supports_jit = False

    def call(self, bag):
        return embedding_bag(self, bag)


class Dlrm(keras.Model):
    """DLRM-DCNv2: bottom MLP and embedding bags, DCNv2 cross layers, top MLP, BCE loss.

    Args:
        cfg: the DLRM config.
        dtype: variable and compute dtype of every layer ("float32"; "float64" for tests).

    The call takes a batch dict: ``dense`` (B, 13) float, ``sparse`` (B, H) int (each feature's
    multi-hot columns in turn, see ``workloads/dlrm/data.py``) and optionally ``labels`` (B,)
    float. It returns ``logits`` (B,) and, with labels, ``loss``: the mean binary cross-entropy
    with logits (float32, float64 for a float64 model).
    """

    def __init__(self, cfg: DlrmConfig, *, dtype: str = "float32", **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        self.cfg = cfg
        self.bottom_mlp = Mlp(cfg.bottom_mlp, True, name="bottom_mlp", dtype=dtype)
        self.embedding_bags = [
            EmbeddingBag(
                rows,
                cfg.embedding_dim,
                embeddings_initializer="zeros",
                name=f"embedding_bags.{i}",
                dtype=dtype,
            )
            for i, rows in enumerate(cfg.table_sizes)
        ]
        for table in self.embedding_bags:
            table.build()  # every variable before the first call (load_canonical)
        self.interaction = CrossNet(cfg, name="interaction", dtype=dtype)
        self.top_mlp = Mlp(cfg.top_mlp, False, name="top_mlp", dtype=dtype)
        self._offsets = [int(o) for o in bag_offsets(cfg.multi_hot_sizes)]

    def call(self, batch, training=False):
        dense = ops.cast(batch["dense"], self.compute_dtype)  # (B, 13)
        sparse = batch["sparse"]  # (B, H)
        pooled = [self.bottom_mlp(dense)]  # (B, E)
        for f, table in enumerate(self.embedding_bags):
            bag = sparse[:, self._offsets[f] : self._offsets[f + 1]]  # (B, hot_f)
            pooled.append(ops.cast(table(bag), self.compute_dtype))  # (B, E)
        x0 = ops.concatenate(pooled, axis=1)  # (B, D)
        logits = self.top_mlp(self.interaction(x0))[:, 0]  # (B,)
        out = {"logits": logits}
        labels = batch.get("labels")
        if labels is not None:
            out["loss"] = click_loss(logits, labels)
        return out

    def get_config(self) -> dict:
        return {"cfg": self.cfg.to_dict(), "dtype": self.dtype_policy.name, "name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> Dlrm:
        cfg = DlrmConfig(**config["cfg"])
        return cls(cfg, dtype=config["dtype"], name=config["name"])


def click_loss(logits, labels):
    """Mean binary cross-entropy of ``logits`` (B,) against 0/1 ``labels`` (B,), in float32
    (float64 for float64 logits); TF's stable ``max(z, 0) - z y + log(1 + exp(-|z|))``."""
    dtype = "float64" if keras.backend.standardize_dtype(logits.dtype) == "float64" else "float32"
    logits = ops.cast(logits, dtype)
    return ops.mean(ops.binary_crossentropy(ops.cast(labels, dtype), logits, from_logits=True))


def dummy_batch(cfg: DlrmConfig, batch_size: int = 1) -> dict:
    """Zeros with the batch's keys, shapes and dtypes; creates every variable."""
    return {
        "dense": np.zeros((batch_size, cfg.num_dense), np.float32),
        "sparse": np.zeros((batch_size, sum(cfg.multi_hot_sizes)), np.int32),
        "labels": np.zeros((batch_size,), np.float32),
    }


def build(cfg: DlrmConfig, *, dtype: str = "float32") -> Dlrm:
    """A Dlrm with every variable created (zeros), ready for ``load_canonical``.

    Args:
        cfg: the DLRM config.
        dtype: "float32" (training, parity), "mixed_bfloat16" (bf16 training: float32 tables
            and weights, bfloat16 compute) or "float64" (tests against the numpy reference).
    """
    model = Dlrm(cfg, dtype=dtype, name="dlrm")
    model(dummy_batch(cfg), training=False)
    return model

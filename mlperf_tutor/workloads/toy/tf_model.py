"""The toy model in Keras 3 / TensorFlow: one of every foundational layer.

Same forward as ``workloads/toy/__init__.py`` and ``torch_model.py``, with the same attribute
names (the canonical names). Not an MLPerf benchmark. Layer references: BatchNorm
(https://arxiv.org/abs/1502.03167), GroupNorm (https://arxiv.org/abs/1803.08494), LayerNorm
(https://arxiv.org/abs/1607.06450), exact GELU (https://arxiv.org/abs/1606.08415).

PyTorch defaults are spelt out: explicit zero padding then ``padding="valid"`` (Keras "same"
pads a strided convolution asymmetrically, PyTorch symmetrically), every epsilon and momentum
from the config, GELU with ``approximate=False``.
"""

from __future__ import annotations

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
import numpy as np
from keras import ops

from mlperf_tutor.layers.tf.norms import BatchNorm
from mlperf_tutor.workloads.toy.config import ToyConfig


class ToyModel(keras.Model):
    """Image branch (conv, BatchNorm, conv, GroupNorm) + token branch (embedding, Conv1d), then
    an MLP head with LayerNorm and exact GELU.

    Args:
        cfg: the toy config; every eps, momentum and init std comes from it.
        dtype: variable and compute dtype of every layer ("float32"; "bfloat16" works too).
    """

    def __init__(self, cfg: ToyConfig, dtype: str = "float32", **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        self.cfg = cfg
        c, d = cfg.channels, cfg.embed_dim
        normal = keras.initializers.RandomNormal(stddev=cfg.init_std)
        common = {"dtype": dtype, "kernel_initializer": normal, "padding": "valid"}
        # conv1 has no bias: BatchNorm right after it cancels any bias.
        self.conv1 = keras.layers.Conv2D(c, 3, strides=1, use_bias=False, name="conv1", **common)
        self.bn = BatchNorm(cfg.bn_momentum, cfg.norm_eps, axis=-1, name="bn", dtype=dtype)
        self.conv2 = keras.layers.Conv2D(c, 3, strides=2, name="conv2", **common)
        self.gn = keras.layers.GroupNormalization(
            cfg.groups, axis=-1, epsilon=cfg.norm_eps, name="gn", dtype=dtype
        )
        self.embed = keras.layers.Embedding(
            cfg.vocab_size, d, embeddings_initializer=normal, name="embed", dtype=dtype
        )
        self.conv1d = keras.layers.Conv1D(d, 3, strides=1, name="conv1d", **common)
        dense = {"dtype": dtype, "kernel_initializer": normal}
        self.fc1 = keras.layers.Dense(cfg.hidden, name="fc1", **dense)
        self.ln = keras.layers.LayerNormalization(
            axis=-1, epsilon=cfg.norm_eps, name="ln", dtype=dtype
        )
        self.head = keras.layers.Dense(cfg.num_classes, name="head", **dense)

    def call(self, batch, training=False):
        pad_hw = [[0, 0], [1, 1], [1, 1], [0, 0]]
        x = ops.transpose(batch["image"], (0, 2, 3, 1))  # (B, H, W, C_in)
        x = ops.relu(self.bn(self.conv1(ops.pad(x, pad_hw)), training=training))  # (B, H, W, C)
        x = ops.relu(self.gn(self.conv2(ops.pad(x, pad_hw))))  # (B, H/2, W/2, C)
        x = ops.mean(x, axis=(1, 2))  # (B, C)
        t = self.embed(batch["tokens"])  # (B, T, D)
        t = ops.relu(self.conv1d(ops.pad(t, [[0, 0], [1, 1], [0, 0]])))  # (B, T, D)
        t = ops.mean(t, axis=1)  # (B, D)
        h = ops.gelu(self.ln(self.fc1(ops.concatenate([x, t], axis=-1))), approximate=False)
        logits = self.head(h)  # (B, num_classes)
        # The loss in float32 even for a bfloat16 model, as PyTorch's autocast does.
        loss = ops.mean(
            ops.sparse_categorical_crossentropy(
                batch["labels"], ops.cast(logits, "float32"), from_logits=True
            )
        )
        return {"logits": logits, "loss": loss}

    def get_config(self) -> dict:
        return {"cfg": self.cfg.to_dict(), "dtype": self.dtype_policy.name, "name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> ToyModel:
        return cls(ToyConfig(**config["cfg"]), dtype=config["dtype"], name=config["name"])


def dummy_batch(cfg: ToyConfig, batch_size: int = 2) -> dict[str, np.ndarray]:
    """Zeros of the batch's shapes and dtypes (builds the model's variables)."""
    s = cfg.image_size
    return {
        "image": np.zeros((batch_size, cfg.in_channels, s, s), np.float32),
        "tokens": np.zeros((batch_size, cfg.seq_len), np.int32),
        "labels": np.zeros((batch_size,), np.int32),
    }


def build(cfg: ToyConfig, dtype: str = "float32") -> ToyModel:
    """A ToyModel with every variable created (so ``load_canonical`` works before any call).

    Args:
        cfg: the toy config.
        dtype: a Keras dtype policy: "float32" (parity), "mixed_bfloat16" (bf16 training:
            float32 variables, bfloat16 compute) or "bfloat16".
    """
    model = ToyModel(cfg, dtype=dtype, name="toy_model")
    model(dummy_batch(cfg), training=False)  # inference mode: the running statistics stay put
    return model

"""GPT-3 and GPT-J decoders in Keras 3 / TensorFlow: one model, two configs.

References: GPT-3, Brown et al. 2020 (https://arxiv.org/abs/2005.14165) as MLPerf trains it
(mlcommons/training ``large_language_model/megatron-lm``); GPT-J 6B, Wang & Komatsuzaki 2021
(https://github.com/kingoflolz/mesh-transformer-jax). The forward is specified in
``workloads/gpt/__init__.py``; attribute names (and Keras ``name=``) are the canonical names.
"""

from __future__ import annotations

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
import numpy as np
from keras import ops

from mlperf_tutor.layers.tf.block import TransformerBlock, check_input_length
from mlperf_tutor.layers.tf.losses import next_token_loss
from mlperf_tutor.workloads.gpt.config import GptConfig


def _embedding(n: int, dim: int, name: str, dtype) -> keras.layers.Embedding:
    # Zeros: the weights come from load_canonical (see layers/tf/lora.py).
    return keras.layers.Embedding(n, dim, embeddings_initializer="zeros", name=name, dtype=dtype)


class GptEmbeddings(keras.layers.Layer):
    """Token embeddings (+ learned positions for GPT-3), then dropout.

    ``position_embeddings`` exists only when ``cfg.position == "learned"``; rotary models
    (GPT-J) get their positions inside attention.

    Args:
        cfg: the GPT config (padded vocabulary, positions, width, dropout).
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(self, cfg: GptConfig, **kwargs):
        super().__init__(**kwargs)
        dtype, d = self.dtype_policy, cfg.hidden
        self.learned_positions = cfg.position == "learned"
        self.word_embeddings = _embedding(cfg.padded_vocab_size, d, "word_embeddings", dtype)
        if self.learned_positions:
            self.position_embeddings = _embedding(
                cfg.max_positions, d, "position_embeddings", dtype
            )
        self.dropout = keras.layers.Dropout(cfg.dropout, name="dropout", dtype=dtype)

    def call(self, input_ids, training=False):
        x = self.word_embeddings(input_ids)  # (B, T, D)
        if self.learned_positions:
            x = x + self.position_embeddings(ops.arange(ops.shape(input_ids)[1]))[None]
        return self.dropout(x, training=training)


class GptDecoder(keras.Model):
    """Decoder-only causal language model with its next-token loss.

    Args:
        cfg: the GPT config (GPT-3 or GPT-J).
        fused: the attention's fused path (``keras.ops.dot_product_attention``; see
            ``layers/tf/attention.py``); with ``cfg.dropout > 0`` the attention stays explicit
            (the kernel has no attention-probability dropout).
        dtype: variable and compute dtype of every layer ("float32"; "float64" and "bfloat16"
            work too).

    The call takes a batch dict: ``input_ids`` (B, T) int and optionally ``labels`` (B, T) int
    (-100: ignored), for any T up to ``cfg.max_positions``. It returns ``logits`` (B, T, V) and,
    with labels, ``loss``: the mean next-token cross-entropy over the labelled tokens (float32,
    float64 for a float64 model).
    """

    def __init__(self, cfg: GptConfig, *, fused: bool = False, dtype: str = "float32", **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        self.cfg, self.fused = cfg, fused
        self.spec = cfg.block_spec().with_fused(fused, kernel_has_dropout=False)
        self.embeddings = GptEmbeddings(cfg, name="embeddings", dtype=dtype)
        self.blocks = [
            TransformerBlock(self.spec, name=f"blocks.{i}", dtype=dtype)
            for i in range(cfg.num_layers)
        ]
        self.final_norm = keras.layers.LayerNormalization(
            epsilon=cfg.norm_eps, name="final_norm", dtype=dtype
        )
        if not cfg.tie_embeddings:
            self.lm_head = keras.layers.Dense(
                cfg.padded_vocab_size,
                use_bias=cfg.lm_head_bias,
                kernel_initializer="zeros",
                name="lm_head",
                dtype=dtype,
            )

    def call(self, batch, training=False):
        check_input_length(self.spec, batch["input_ids"])  # before the position table
        x = self.embeddings(batch["input_ids"], training=training)  # (B, T, D)
        for block in self.blocks:
            x = block(x, training=training)  # (B, T, D)
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            table = ops.cast(self.embeddings.word_embeddings.embeddings, x.dtype)  # (V, D)
            logits = ops.einsum("BTD,VD->BTV", x, table)
        else:
            logits = self.lm_head(x)  # (B, T, V)
        out = {"logits": logits}
        labels = batch.get("labels")
        if labels is not None:
            out["loss"] = next_token_loss(logits, labels)
        return out

    def get_config(self) -> dict:
        return {
            "cfg": self.cfg.to_dict(),
            "fused": self.fused,
            "dtype": self.dtype_policy.name,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict) -> GptDecoder:
        # Every field is in the dict, so the base class rebuilds GPT-3 and GPT-J alike.
        cfg = GptConfig(**config["cfg"])
        return cls(cfg, fused=config["fused"], dtype=config["dtype"], name=config["name"])


def dummy_batch(batch_size: int = 1, seq_len: int = 2) -> dict:
    """Zeros with the batch's keys and dtypes; a short sequence creates every variable."""
    tokens = np.zeros((batch_size, seq_len), np.int32)
    return {"input_ids": tokens, "labels": tokens}


def build(cfg: GptConfig, *, fused: bool = False, dtype: str = "float32") -> GptDecoder:
    """A GptDecoder with every variable created (zeros), ready for ``load_canonical``.

    Args:
        cfg: the GPT-3 or GPT-J config.
        fused: the attention's fused path (GPU benchmarks); the explicit path is the reference.
        dtype: a Keras dtype policy: "float32" (parity), "mixed_bfloat16" (bf16 training:
            float32 variables, bfloat16 compute), "float64" (tests against the numpy reference)
            or "bfloat16".
    """
    model = GptDecoder(cfg, fused=fused, dtype=dtype, name="gpt_decoder")
    model(dummy_batch(), training=False)
    return model

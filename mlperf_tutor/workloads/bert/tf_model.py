"""BERT pre-training (masked LM + next-sentence prediction) in Keras 3 / TensorFlow.

Reference: mlcommons/training ``language_model/tensorflow/bert/modeling.py`` and
``run_pretraining.py``; Devlin et al. 2019 (https://arxiv.org/abs/1810.04805). The forward is
specified in ``workloads/bert/__init__.py``; attribute names are the canonical names.
"""

from __future__ import annotations

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
import numpy as np
from keras import ops

from mlperf_tutor.layers.tf.block import TransformerBlock, check_input_length
from mlperf_tutor.workloads.bert.config import MLM_DENOMINATOR_EPS, BertConfig


def _embedding(n: int, dim: int, name: str, dtype) -> keras.layers.Embedding:
    # Zeros: the weights come from load_canonical (see layers/tf/lora.py).
    return keras.layers.Embedding(n, dim, embeddings_initializer="zeros", name=name, dtype=dtype)


def _dense(units: int, name: str, dtype) -> keras.layers.Dense:
    return keras.layers.Dense(units, kernel_initializer="zeros", name=name, dtype=dtype)


class BertEmbeddings(keras.layers.Layer):
    """Word + token-type + position embeddings, then LayerNorm and dropout.

    Args:
        cfg: the BERT config (vocabulary, positions, width, eps, dropout).
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(self, cfg: BertConfig, **kwargs):
        super().__init__(**kwargs)
        dtype, d = self.dtype_policy, cfg.hidden
        self.word_embeddings = _embedding(cfg.vocab_size, d, "word_embeddings", dtype)
        self.position_embeddings = _embedding(cfg.max_positions, d, "position_embeddings", dtype)
        self.token_type_embeddings = _embedding(
            cfg.type_vocab_size, d, "token_type_embeddings", dtype
        )
        self.norm = keras.layers.LayerNormalization(epsilon=cfg.norm_eps, name="norm", dtype=dtype)
        self.dropout = keras.layers.Dropout(cfg.dropout, name="dropout", dtype=dtype)

    def call(self, input_ids, segment_ids, training=False):
        positions = ops.arange(ops.shape(input_ids)[1])  # (S,)
        # The reference's order of the sums: word, then token type, then position.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(segment_ids)  # (B, S, D)
        x = x + self.position_embeddings(positions)[None]
        return self.dropout(self.norm(x), training=training)


class BertPooler(keras.layers.Layer):
    """``tanh(dense(x[:, 0]))``: the [CLS] token's summary for next-sentence prediction."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dense = _dense(dim, "dense", self.dtype_policy)

    def call(self, x):
        return ops.tanh(self.dense(x[:, 0]))  # (B, D)


class BertMlmHead(keras.layers.Layer):
    """Masked-LM head: dense, exact GELU, LayerNorm, then the tied decoder ``h @ E^T + bias``.

    The decoder's matrix is the word-embedding matrix E (V, D), passed to the call so that the
    head owns only ``dense``, ``norm`` and ``bias`` (V,).

    Args:
        dim: model width D.
        vocab_size: vocabulary size V.
        norm_eps: LayerNorm epsilon.
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(self, dim: int, vocab_size: int, norm_eps: float, **kwargs):
        super().__init__(**kwargs)
        dtype = self.dtype_policy
        self.dense = _dense(dim, "dense", dtype)
        self.norm = keras.layers.LayerNormalization(epsilon=norm_eps, name="norm", dtype=dtype)
        self.vocab_size = vocab_size

    def build(self, input_shape):
        # Here rather than in __init__, so that its Keras path is under the head's name scope.
        self.bias = self.add_weight(shape=(self.vocab_size,), initializer="zeros", name="bias")

    def call(self, x, embeddings):
        h = self.norm(ops.gelu(self.dense(x), approximate=False))  # (B, P, D)
        return ops.einsum("BPD,VD->BPV", h, ops.cast(embeddings, h.dtype)) + self.bias


class BertPretraining(keras.Model):
    """BERT encoder with the masked-LM and next-sentence heads and their losses: ``mlm_loss``
    (the mean over masked positions), ``nsp_loss`` (the mean over examples) and their sum
    ``loss`` (the two means apart, so a sharded step can weight each by its own count).

    Args:
        cfg: the BERT config.
        dtype: variable and compute dtype of every layer ("float32"; "bfloat16" works too).

    The call takes the batch of ``BertWorkload.synthetic_batch`` (tensors) and returns
    ``mlm_logits`` (B, P, V), ``nsp_logits`` (B, 2) and ``loss`` (MLM + NSP, float32).
    """

    def __init__(self, cfg: BertConfig, dtype: str = "float32", **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        self.cfg = cfg
        self.spec = cfg.block_spec()
        d = cfg.hidden
        self.embeddings = BertEmbeddings(cfg, name="embeddings", dtype=dtype)
        self.blocks = [
            TransformerBlock(self.spec, name=f"blocks.{i}", dtype=dtype)
            for i in range(cfg.num_layers)
        ]
        self.pooler = BertPooler(d, name="pooler", dtype=dtype)
        self.mlm_head = BertMlmHead(d, cfg.vocab_size, cfg.norm_eps, name="mlm_head", dtype=dtype)
        self.nsp_head = _dense(2, "nsp_head", dtype)

    def call(self, batch, training=False):
        check_input_length(self.spec, batch["input_ids"])  # before the position table
        mask = batch["input_mask"]
        x = self.embeddings(batch["input_ids"], batch["segment_ids"], training=training)
        for block in self.blocks:
            x = block(x, mask, training=training)  # (B, S, D)
        positions = batch["masked_lm_positions"]  # (B, P), zero-padded
        # Only the P masked positions go through the MLM head.
        picked = ops.take_along_axis(x, ops.expand_dims(positions, -1), axis=1)  # (B, P, D)
        mlm_logits = self.mlm_head(picked, self.embeddings.word_embeddings.embeddings)
        nsp_logits = self.nsp_head(self.pooler(x))  # (B, 2)

        # Losses in float32 even for a bfloat16 model, as PyTorch's autocast does.
        ce = ops.sparse_categorical_crossentropy(
            batch["masked_lm_ids"], ops.cast(mlm_logits, "float32"), from_logits=True
        )  # (B, P)
        weights = ops.cast(ops.not_equal(positions, 0), "float32")
        mlm_loss = ops.sum(ce * weights) / (ops.sum(weights) + MLM_DENOMINATOR_EPS)
        nsp_loss = ops.mean(
            ops.sparse_categorical_crossentropy(
                batch["next_sentence_labels"], ops.cast(nsp_logits, "float32"), from_logits=True
            )
        )
        return {
            "mlm_logits": mlm_logits,
            "nsp_logits": nsp_logits,
            "mlm_loss": mlm_loss,
            "nsp_loss": nsp_loss,
            "loss": mlm_loss + nsp_loss,
        }

    def get_config(self) -> dict:
        return {"cfg": self.cfg.to_dict(), "dtype": self.dtype_policy.name, "name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> BertPretraining:
        return cls(BertConfig(**config["cfg"]), dtype=config["dtype"], name=config["name"])


def dummy_batch(batch_size: int = 1, seq_len: int = 2, predictions: int = 1) -> dict:
    """Zeros with the batch's keys and dtypes; a short sequence creates every variable."""
    tokens = np.zeros((batch_size, seq_len), np.int32)
    preds = np.zeros((batch_size, predictions), np.int32)
    return {
        "input_ids": tokens,
        "segment_ids": tokens,
        "input_mask": tokens,
        "masked_lm_positions": preds,
        "masked_lm_ids": preds,
        "next_sentence_labels": np.zeros((batch_size,), np.int32),
    }


def build(cfg: BertConfig, dtype: str = "float32") -> BertPretraining:
    """A BertPretraining with every variable created (zeros), ready for ``load_canonical``.

    Args:
        cfg: the BERT config.
        dtype: a Keras dtype policy: "float32" (parity), "mixed_bfloat16" (bf16 training:
            float32 variables, bfloat16 compute) or "bfloat16".
    """
    model = BertPretraining(cfg, dtype=dtype, name="bert_pretraining")
    model(dummy_batch(), training=False)
    return model

"""Llama 2 with LoRA adapters in Keras 3 / TensorFlow (MLPerf Training ``llama2_70b_lora``).

References: Touvron et al. 2023, Llama 2 (https://arxiv.org/abs/2307.09288); the fused-qkv model
the MLPerf reference fine-tunes (mlcommons/training ``llama2_70b_lora``); LoRA, Hu et al. 2021
(https://arxiv.org/abs/2106.09685). The forward is specified in ``workloads/llama/__init__.py``;
attribute names (and Keras ``name=``) are the canonical names.
"""

from __future__ import annotations

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter

# isort: split
import keras
import numpy as np

from mlperf_tutor.layers.spec import is_adapter
from mlperf_tutor.layers.tf.block import TransformerBlock, check_input_length
from mlperf_tutor.layers.tf.losses import next_token_loss
from mlperf_tutor.layers.tf.norms import RMSNorm
from mlperf_tutor.workloads.llama.config import LlamaConfig


class LlamaDecoder(keras.Model):
    """Llama 2 causal LM: token embeddings, L pre-RMSNorm blocks (grouped-query attention with
    rotary positions and a fused ``qkv_proj``, SwiGLU MLP), final RMSNorm, untied head.

    The call takes a batch dict with ``input_ids`` (B, T), optional ``attention_mask`` (B, T)
    (0: padding key) and optional ``labels`` (B, T) aligned with ``input_ids`` (-100: not
    predicted); it returns ``{"logits": (B, T, V)}`` plus ``"loss"``, the mean cross-entropy of
    predicting ``labels[:, t + 1]`` at position t over the labelled tokens (float32, float64 for
    a float64 model), when labels are given.

    Args:
        cfg: the Llama config; ``lora_rank > 0`` puts adapters on ``qkv_proj`` and ``o_proj``.
        fused: ``keras.ops.dot_product_attention`` in every block (GPU benchmarks; see
            ``layers/tf/attention.py``).
        dtype: variable and compute dtype of every layer ("float32"; "float64" and "bfloat16"
            work too).
    """

    def __init__(self, cfg: LlamaConfig, *, fused: bool = False, dtype: str = "float32", **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        self.cfg, self.fused = cfg, fused
        self.spec = cfg.block_spec().with_fused(fused, kernel_has_dropout=False)
        self.word_embeddings = keras.layers.Embedding(
            cfg.vocab_size,
            cfg.hidden,
            embeddings_initializer="zeros",
            name="word_embeddings",
            dtype=dtype,
        )
        self.blocks = [
            TransformerBlock(self.spec, name=f"blocks.{i}", dtype=dtype)
            for i in range(cfg.num_layers)
        ]
        self.final_norm = RMSNorm(cfg.norm_eps, name="final_norm", dtype=dtype)
        self.lm_head = keras.layers.Dense(
            cfg.vocab_size, use_bias=False, kernel_initializer="zeros", name="lm_head", dtype=dtype
        )

    def call(self, batch, training=False):
        input_ids = batch["input_ids"]  # (B, T)
        check_input_length(self.spec, input_ids)
        key_mask = batch.get("attention_mask")  # (B, T) or None
        x = self.word_embeddings(input_ids)  # (B, T, D)
        for block in self.blocks:
            x = block(x, key_mask, training=training)  # (B, T, D)
        logits = self.lm_head(self.final_norm(x))  # (B, T, V)
        out = {"logits": logits}
        labels = batch.get("labels")
        if labels is not None:
            # Hugging Face's shift: position t predicts labels[:, t + 1].
            out["loss"] = next_token_loss(logits[:, :-1], labels[:, 1:])
        return out

    def get_config(self) -> dict:
        return {
            "cfg": self.cfg.to_dict(),
            "fused": self.fused,
            "dtype": self.dtype_policy.name,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict) -> LlamaDecoder:
        cfg = LlamaConfig(**config["cfg"])
        return cls(cfg, fused=config["fused"], dtype=config["dtype"], name=config["name"])


def dummy_batch(batch_size: int = 1, seq_len: int = 2) -> dict:
    """Zeros with the batch's keys and dtypes; a short sequence creates every variable."""
    tokens = np.zeros((batch_size, seq_len), np.int32)
    return {"input_ids": tokens, "attention_mask": np.ones_like(tokens), "labels": tokens}


def build(cfg: LlamaConfig, *, fused: bool = False, dtype: str = "float32") -> LlamaDecoder:
    """A LlamaDecoder with every variable created (zeros), ready for ``load_canonical``; with
    LoRA only the adapters are trainable.

    Args:
        cfg: the Llama config.
        fused: the attention's fused path (GPU benchmarks); the explicit path is the reference.
        dtype: a Keras dtype policy: "float32" (parity), "mixed_bfloat16" (bf16 training:
            float32 variables, bfloat16 compute), "float64" (tests against the numpy reference)
            or "bfloat16".
    """
    model = LlamaDecoder(cfg, fused=fused, dtype=dtype, name="llama_decoder")
    model(dummy_batch(), training=False)
    if cfg.lora_rank:
        _adapter.set_trainable(model, is_adapter)
    return model

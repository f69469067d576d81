"""Llama 2 with LoRA adapters in Flax NNX (MLPerf Training ``llama2_70b_lora``).

References: Touvron et al. 2023, Llama 2 (https://arxiv.org/abs/2307.09288); the fused-qkv model
the MLPerf reference fine-tunes (mlcommons/training ``llama2_70b_lora``); LoRA, Hu et al. 2021
(https://arxiv.org/abs/2106.09685). The forward is specified in ``workloads/llama/__init__.py``;
attribute names equal the PyTorch and Keras models', and the adapter's layout rules give the
canonical names. Letters: B batch, T tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlperf_tutor.frameworks.jax import init_empty, set_trainable
from mlperf_tutor.layers.jax.block import TransformerBlock
from mlperf_tutor.layers.jax.losses import next_token_loss
from mlperf_tutor.layers.jax.norms import RMSNorm
from mlperf_tutor.layers.spec import is_adapter
from mlperf_tutor.workloads.llama.config import LlamaConfig


class LlamaDecoder(nnx.Module):
    """Llama 2 causal LM: token embeddings, L pre-RMSNorm blocks (grouped-query attention with
    rotary positions and a fused ``qkv_proj``, SwiGLU MLP), final RMSNorm, untied head.

    Takes a batch dict with ``input_ids`` (B, T), optional ``attention_mask`` (B, T) (0: padding
    key) and optional ``labels`` (B, T) aligned with ``input_ids`` (-100: not predicted);
    returns ``{"logits": (B, T, V)}`` plus ``"loss"``, the mean cross-entropy of predicting
    ``labels[:, t + 1]`` at position t over the labelled tokens, when labels are given.

    Args:
        cfg: the Llama config; ``lora_rank > 0`` puts adapters on ``qkv_proj`` and ``o_proj``.
        fused: ``jax.nn.dot_product_attention`` in every block (GPU benchmarks).
        fused_implementation: its implementation, "xla" or "cudnn"; None: cuDNN for bf16/fp16
            on GPU, XLA otherwise (see :class:`~mlperf_tutor.layers.jax.attention.Attention`).
        rngs: initialisers' keys and the LoRA dropout streams.
    """

    def __init__(
        self,
        cfg: LlamaConfig,
        *,
        fused: bool = False,
        fused_implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.spec = cfg.block_spec().with_fused(
            fused, fused_implementation, kernel_has_dropout=False
        )
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs)
        self.blocks = nnx.List(
            TransformerBlock(self.spec, rngs=rngs) for _ in range(cfg.num_layers)
        )
        self.final_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nnx.Linear(cfg.hidden, cfg.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        input_ids = batch["input_ids"]  # (B, T)
        self.spec.check_length(input_ids.shape[1])
        key_mask = batch.get("attention_mask")  # (B, T) or None
        # A plain gather: nnx.Embed's call casts its output to float32 (its dtype defaults to
        # the parameter dtype), which would turn bf16 mixed precision back into float32.
        x = jnp.take(self.word_embeddings.embedding[...], input_ids, axis=0)  # (B, T, D)
        for block in self.blocks:
            x = block(x, key_mask)
        logits = self.lm_head(self.final_norm(x))  # (B, T, V)
        out = {"logits": logits}
        if batch.get("labels") is not None:
            # Position t predicts labels[:, t + 1] (Hugging Face's shift).
            out["loss"] = next_token_loss(logits[:, :-1], batch["labels"][:, 1:])
        return out


def build(
    cfg: LlamaConfig,
    *,
    fused: bool = False,
    fused_implementation: str | None = None,
    dtype: Any = jnp.float32,
) -> LlamaDecoder:
    """A LlamaDecoder with zero weights (the workload loads them, ``load_canonical``); with
    LoRA only the adapters are trainable (the base weights are ``Frozen``, see
    ``frameworks.jax.set_trainable``).

    Args:
        cfg: the Llama config.
        fused: fused causal attention (see :class:`LlamaDecoder`).
        fused_implementation: "xla", "cudnn" or None (see :class:`LlamaDecoder`).
        dtype: dtype of every weight, adapters included (as the PyTorch build's ``.to(dtype)``),
            e.g. ``jnp.bfloat16`` for a GPU benchmark; allocated in that dtype directly.
    """
    dtype = jnp.dtype(dtype)

    def make() -> LlamaDecoder:
        model = LlamaDecoder(
            cfg, fused=fused, fused_implementation=fused_implementation, rngs=nnx.Rngs(0)
        )
        # Under init_empty's abstract trace: only the dtype changes, nothing is allocated.
        for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            var.set_value(var.get_value().astype(dtype))
        return model

    model = init_empty(make)
    if cfg.lora_rank:
        set_trainable(model, is_adapter)
    return model

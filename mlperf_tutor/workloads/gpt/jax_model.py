"""GPT-3 and GPT-J decoders in Flax NNX, one class for both.

References: Brown et al. 2020 (GPT-3, https://arxiv.org/abs/2005.14165) as mlcommons/training
``large_language_model/megatron-lm`` trains it; Wang & Komatsuzaki 2021 (GPT-J,
https://github.com/kingoflolz/mesh-transformer-jax) for rotary positions and parallel blocks.
The forward is specified in ``workloads/gpt/__init__.py``; attribute names equal the PyTorch and
Keras models', and the adapter's layout rules give the canonical names. Letters: B batch,
T tokens, D hidden, V padded vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlperf_tutor.frameworks.jax import init_empty
from mlperf_tutor.layers.jax.block import TransformerBlock
from mlperf_tutor.layers.jax.losses import next_token_loss
from mlperf_tutor.workloads.gpt.config import GptConfig


class GptEmbeddings(nnx.Module):
    """Word embeddings (+ learned positions 0..T-1 for GPT-3), then dropout.

    Args:
        cfg: the GPT config; ``position_embeddings`` exists only when ``cfg.position`` is
            "learned" (GPT-J's positions are rotary, inside attention).
        rngs: initialisers' keys and the dropout stream.
    """

    def __init__(self, cfg: GptConfig, *, rngs: nnx.Rngs):
        self.learned_positions = cfg.position == "learned"
        self.word_embeddings = nnx.Embed(cfg.padded_vocab_size, cfg.hidden, rngs=rngs)
        if self.learned_positions:
            self.position_embeddings = nnx.Embed(cfg.max_positions, cfg.hidden, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        # A plain gather: nnx.Embed's call casts its output to float32 (its dtype defaults to
        # the parameter dtype), which would turn bf16 mixed precision back into float32.
        x = jnp.take(self.word_embeddings.embedding[...], input_ids, axis=0)  # (B, T, D)
        if self.learned_positions:
            x = x + self.position_embeddings.embedding[: input_ids.shape[1]][None]
        return self.dropout(x)


class GptDecoder(nnx.Module):
    """Decoder-only causal LM: embeddings, causal blocks, final LayerNorm, LM head.

    Args:
        cfg: the GPT config (pre-LN blocks for GPT-3, parallel blocks for GPT-J; tied or
            separate LM head).
        fused: fused attention (``jax.nn.dot_product_attention``, causal), the training path on
            accelerators; with ``cfg.dropout > 0`` the attention stays explicit (the kernel has
            no attention-probability dropout).
        fused_implementation: its implementation, "xla" or "cudnn"; None: cuDNN for bf16/fp16
            on GPU, XLA otherwise (see :class:`~mlperf_tutor.layers.jax.attention.Attention`).
        rngs: initialisers' keys and the dropout streams.
    """

    def __init__(
        self,
        cfg: GptConfig,
        *,
        fused: bool = False,
        fused_implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.tie_embeddings = cfg.tie_embeddings
        self.embeddings = GptEmbeddings(cfg, rngs=rngs)
        self.spec = cfg.block_spec().with_fused(
            fused, fused_implementation, kernel_has_dropout=False
        )
        self.blocks = nnx.List(
            TransformerBlock(self.spec, rngs=rngs) for _ in range(cfg.num_layers)
        )
        self.final_norm = nnx.LayerNorm(
            cfg.hidden, epsilon=cfg.norm_eps, use_fast_variance=False, rngs=rngs
        )
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(
                cfg.hidden, cfg.padded_vocab_size, use_bias=cfg.lm_head_bias, rngs=rngs
            )

    def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        self.spec.check_length(batch["input_ids"].shape[1])  # before the position table
        x = self.embeddings(batch["input_ids"])  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        if self.tie_embeddings:
            table = self.embeddings.word_embeddings.embedding[...]  # (V, D)
            logits = jnp.einsum("BTD,VD->BTV", x, table)
        else:
            logits = self.lm_head(x)  # (B, T, V)
        out = {"logits": logits}
        if "labels" in batch:
            out["loss"] = next_token_loss(logits, batch["labels"])
        return out


def build(
    cfg: GptConfig, *, fused: bool = False, fused_implementation: str | None = None
) -> GptDecoder:
    """A float32 GptDecoder with zero weights; the workload loads them (``load_canonical``).

    Args:
        cfg: the GPT-3 or GPT-J config.
        fused: fused causal attention (see :class:`GptDecoder`).
        fused_implementation: "xla", "cudnn" or None (see :class:`GptDecoder`).
    """
    return init_empty(
        lambda: GptDecoder(
            cfg, fused=fused, fused_implementation=fused_implementation, rngs=nnx.Rngs(0)
        )
    )

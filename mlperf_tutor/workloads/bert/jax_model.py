"""BERT pre-training (masked LM + next-sentence prediction) in Flax NNX.

Reference: mlcommons/training ``language_model/tensorflow/bert/modeling.py`` and
``run_pretraining.py``; Devlin et al., https://arxiv.org/abs/1810.04805. The forward is specified
in ``workloads/bert/__init__.py``; attribute names equal the PyTorch and Keras models', and the
adapter's layout rules give the canonical names. Letters: B batch, S tokens, P masked positions,
D hidden, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mlperf_tutor.frameworks.jax import init_empty
from mlperf_tutor.layers.jax.block import TransformerBlock
from mlperf_tutor.workloads.bert.config import MLM_DENOMINATOR_EPS, BertConfig


def _norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.hidden, epsilon=cfg.norm_eps, use_fast_variance=False, rngs=rngs)


class BertEmbeddings(nnx.Module):
    """Word + token-type + position embeddings (positions 0..S-1), LayerNorm, dropout.

    Args:
        cfg: the BERT config.
        rngs: initialisers' keys and the dropout stream.
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_positions, cfg.hidden, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden, rngs=rngs)
        self.norm = _norm(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array) -> jax.Array:
        s = input_ids.shape[1]
        # The reference's order of summation: word, then token type, then position.
        # Plain gathers: nnx.Embed's call casts its output to float32 (its dtype defaults to the
        # parameter dtype), which would turn bf16 mixed precision back into float32.
        words = jnp.take(self.word_embeddings.embedding[...], input_ids, axis=0)  # (B, S, D)
        types = jnp.take(self.token_type_embeddings.embedding[...], segment_ids, axis=0)
        x = words + types
        x = x + self.position_embeddings.embedding[:s][None]
        return self.dropout(self.norm(x))


class BertPooler(nnx.Module):
    """``tanh(dense(x[:, 0]))``: the [CLS] token's representation for next-sentence prediction.

    Args:
        cfg: the BERT config.
        rngs: initialisers' keys.
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(cfg.hidden, cfg.hidden, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(x[:, 0]))  # (B, D)


class BertMlmHead(nnx.Module):
    """Masked-LM head: dense, exact GELU, LayerNorm, then the tied word-embedding decoder.

    The decoder's matrix is the word embeddings (passed to the call); only its bias is a
    parameter here.

    Args:
        cfg: the BERT config.
        rngs: initialisers' keys.
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(cfg.hidden, cfg.hidden, rngs=rngs)
        self.norm = _norm(cfg, rngs)
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))

    def __call__(self, x: jax.Array, word_embeddings: jax.Array) -> jax.Array:
        x = self.norm(jax.nn.gelu(self.dense(x), approximate=False))  # (B, P, D)
        return jnp.einsum("BPD,VD->BPV", x, word_embeddings) + self.bias[...]  # (B, P, V)


class BertPretraining(nnx.Module):
    """BERT encoder with the masked-LM and next-sentence heads; returns the logits, ``mlm_loss``
    (the mean over masked positions), ``nsp_loss`` (the mean over examples) and their sum
    ``loss`` (the two means apart, so a sharded step can weight each by its own count).

    Args:
        cfg: the BERT config (dropout is used for hidden and attention-probability dropout).
        fused: fused attention (``jax.nn.dot_product_attention``), the training path on
            accelerators; with ``cfg.dropout > 0`` the attention stays explicit (the kernel has
            no attention-probability dropout).
        rngs: initialisers' keys and the dropout streams.
    """

    def __init__(self, cfg: BertConfig, *, fused: bool = False, rngs: nnx.Rngs):
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.spec = cfg.block_spec().with_fused(fused, kernel_has_dropout=False)
        self.blocks = nnx.List(
            TransformerBlock(self.spec, rngs=rngs) for _ in range(cfg.num_layers)
        )
        self.pooler = BertPooler(cfg, rngs=rngs)
        self.mlm_head = BertMlmHead(cfg, rngs=rngs)
        self.nsp_head = nnx.Linear(cfg.hidden, 2, rngs=rngs)

    def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        self.spec.check_length(batch["input_ids"].shape[1])  # before the position table
        x = self.embeddings(batch["input_ids"], batch["segment_ids"])  # (B, S, D)
        for block in self.blocks:
            x = block(x, batch["input_mask"])
        positions = batch["masked_lm_positions"]  # (B, P); 0 pads the list
        masked = jnp.take_along_axis(x, positions[..., None], axis=1)  # (B, P, D)
        mlm_logits = self.mlm_head(masked, self.embeddings.word_embeddings.embedding[...])
        nsp_logits = self.nsp_head(self.pooler(x))  # (B, 2)

        ce = optax.softmax_cross_entropy_with_integer_labels(
            mlm_logits.astype(jnp.float32), batch["masked_lm_ids"]
        )  # (B, P)
        weights = (positions != 0).astype(jnp.float32)
        mlm_loss = jnp.sum(ce * weights) / (jnp.sum(weights) + MLM_DENOMINATOR_EPS)
        nsp_loss = optax.softmax_cross_entropy_with_integer_labels(
            nsp_logits.astype(jnp.float32), batch["next_sentence_labels"]
        ).mean()
        return {
            "mlm_logits": mlm_logits,
            "nsp_logits": nsp_logits,
            "mlm_loss": mlm_loss,
            "nsp_loss": nsp_loss,
            "loss": mlm_loss + nsp_loss,
        }


def build(cfg: BertConfig, *, fused: bool = False) -> BertPretraining:
    """A float32 BertPretraining with zero weights; the workload loads them (``load_canonical``).

    Args:
        cfg: the BERT config.
        fused: fused attention (see :class:`BertPretraining`).
    """
    return init_empty(lambda: BertPretraining(cfg, fused=fused, rngs=nnx.Rngs(0)))

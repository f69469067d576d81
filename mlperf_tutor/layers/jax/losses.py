"""Losses the language-model workloads share, in JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mlperf_tutor.layers.spec import IGNORE_INDEX


def next_token_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``logits`` (B, T, V) against ``labels`` (B, T) over the labels that
    are not ``IGNORE_INDEX`` (-100) (sum / count), in float32 at least (float64 models stay
    float64). The caller aligns them: GPT's labels are already shifted, Llama shifts here by
    passing ``logits[:, :-1]`` and ``labels[:, 1:]``."""
    keep = labels != IGNORE_INDEX
    acc = jnp.promote_types(logits.dtype, jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(acc), jnp.where(keep, labels, 0)
    )  # (B, T)
    return jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.sum(keep).astype(acc)

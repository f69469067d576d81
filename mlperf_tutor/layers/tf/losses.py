"""Training losses shared by the Keras models."""

from __future__ import annotations

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
from keras import ops

from mlperf_tutor.layers.spec import IGNORE_INDEX
from mlperf_tutor.layers.tf.rotary import math_dtype


def next_token_loss(logits, labels):
    """Mean cross-entropy of ``logits`` (B, T, V) against ``labels`` (B, T) over the labels that
    are not :data:`~mlperf_tutor.layers.spec.IGNORE_INDEX` (sum / count), in float32 (float64
    for float64 logits). The caller aligns them: GPT's labels are already the next tokens,
    Llama shifts by one."""
    dtype = math_dtype(logits.dtype)
    keep = ops.not_equal(labels, IGNORE_INDEX)  # (B, T)
    targets = ops.where(keep, labels, ops.zeros_like(labels))  # any valid id; weighted by 0
    ce = ops.sparse_categorical_crossentropy(
        targets, ops.cast(logits, dtype), from_logits=True
    )  # (B, T)
    weights = ops.cast(keep, dtype)
    return ops.sum(ce * weights) / ops.sum(weights)

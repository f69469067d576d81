"""Rotary position embeddings in Keras (Su et al. 2021, RoFormer,
https://arxiv.org/abs/2104.09864), with the numbers of ``layers/torch/rotary.py``, and the
float32-at-least dtype the attention computes its softmax in."""

from __future__ import annotations

from typing import Literal

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
from keras import ops

from mlperf_tutor.layers.spec import check_rotary

RotaryLayout = Literal["interleaved", "half"]


def math_dtype(dtype) -> str:
    """float64 for float64 tensors, float32 for every other float (float32 at least)."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def apply_rotary(x, rotary_dim: int, base: float = 10000.0, layout: RotaryLayout = "interleaved"):
    """Rotary position embeddings (Su et al. 2021, RoFormer, https://arxiv.org/abs/2104.09864).

    Rotates pair j of the first ``rotary_dim`` dims of every head at position t (0..T-1) by the
    angle ``t * inv_freq[j]``, ``inv_freq = 1 / base ** (arange(0, rotary_dim, 2) / rotary_dim)``;
    the other ``H - rotary_dim`` dims pass through. The angles and the rotation are computed in
    float32 (float64 for float64 inputs); the output has ``x``'s dtype.

    Args:
        x: (B, T, heads, H) queries or keys.
        rotary_dim: dims rotated, even and at most H.
        base: the frequency base (10000 in RoFormer, GPT-J and Llama 2).
        layout: "interleaved" pairs dims (2j, 2j + 1) (GPT-J); "half" pairs (j, j + rotary_dim/2)
            (GPT-NeoX, Llama).

    Returns:
        (B, T, heads, H), ``x``'s dtype.
    """
    head_dim = int(x.shape[-1])
    check_rotary(rotary_dim, head_dim, layout)
    in_dtype = keras.backend.standardize_dtype(x.dtype)
    dtype = math_dtype(in_dtype)
    half = rotary_dim // 2
    exponents = ops.arange(0, rotary_dim, 2, dtype=dtype) / rotary_dim  # (R/2,)
    inv_freq = 1.0 / ops.power(ops.convert_to_tensor(base, dtype=dtype), exponents)  # (R/2,)
    positions = ops.arange(ops.shape(x)[1], dtype=dtype)  # (T,)
    angle = positions[:, None] * inv_freq[None, :]  # (T, R/2)
    cos = ops.cos(angle)[None, :, None, :]  # (1, T, 1, R/2)
    sin = ops.sin(angle)[None, :, None, :]
    rot = ops.cast(x[..., :rotary_dim], dtype)  # (B, T, heads, R)
    if layout == "interleaved":
        a, b = rot[..., 0::2], rot[..., 1::2]  # (B, T, heads, R/2) each
    else:
        a, b = rot[..., :half], rot[..., half:]
    first, second = a * cos - b * sin, b * cos + a * sin
    if layout == "interleaved":
        # (B, T, heads, R/2, 2) -> (B, T, heads, R): back to (2j, 2j + 1) order.
        rot = ops.reshape(ops.stack([first, second], axis=-1), ops.shape(rot))
    else:
        rot = ops.concatenate([first, second], axis=-1)
    rot = ops.cast(rot, in_dtype)
    if rotary_dim == head_dim:
        return rot
    return ops.concatenate([rot, x[..., rotary_dim:]], axis=-1)

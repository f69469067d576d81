"""Rotary position embedding (Su et al. 2021, RoFormer, https://arxiv.org/abs/2104.09864) in JAX.

Dimension letters: B batch, T time, N heads, H head dim, R rotary dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlperf_tutor.layers.spec import check_rotary


def apply_rotary(
    x: jax.Array, rotary_dim: int, base: float = 10000.0, layout: str = "interleaved"
) -> jax.Array:
    """Rotary position embedding (Su et al. 2021, https://arxiv.org/abs/2104.09864).

    Rotates pair j of the first ``rotary_dim`` dims of every head at position t (0..T-1) by the
    angle ``t * base**(-2j / rotary_dim)``; the other dims pass through. The angles, cosines
    and sines are computed in float32 at least (float64 for float64 inputs).

    Args:
        x: queries or keys, (B, T, heads, H).
        rotary_dim: R, the even number of dims rotated (at most H).
        base: the base of the angle frequencies.
        layout: which dims form pair j: "interleaved" (2j, 2j + 1), as GPT-J; "half"
            (j, j + R / 2), as GPT-NeoX and Llama.

    Returns:
        The rotated array, of ``x``'s shape and dtype.
    """
    check_rotary(rotary_dim, x.shape[-1], layout)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    t = x.shape[1]
    inv_freq = 1.0 / base ** (jnp.arange(0, rotary_dim, 2, dtype=acc) / rotary_dim)  # (R/2,)
    angle = jnp.arange(t, dtype=acc)[:, None] * inv_freq  # (T, R/2)
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]  # (1, T, 1, R/2)
    rot, rest = x[..., :rotary_dim].astype(acc), x[..., rotary_dim:]
    if layout == "interleaved":
        pairs = rot.reshape(*rot.shape[:-1], rotary_dim // 2, 2)  # (B, T, N, R/2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        rot = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rot.shape)
    else:
        a, b = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
        rot = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return jnp.concatenate([rot.astype(x.dtype), rest], axis=-1)  # (B, T, N, H)

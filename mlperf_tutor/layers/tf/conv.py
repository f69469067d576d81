"""Keras convolutional blocks of the latent-diffusion UNet, with the numbers of
``layers/torch/conv.py``.

Channels-last (NHWC) throughout: the UNet transposes its NCHW inputs once. Rombach et al. 2022
(https://arxiv.org/abs/2112.10752); residual blocks after He et al. 2016
(https://arxiv.org/abs/1512.03385) with GroupNorm (Wu & He 2018,
https://arxiv.org/abs/1803.08494); timestep sinusoids after Vaswani et al. 2017
(https://arxiv.org/abs/1706.03762).

* :func:`timestep_sinusoid`, :class:`TimestepEmbedding`: the timestep's embedding.
* :class:`ResnetBlock`: GroupNorm, SiLU, conv, plus the timestep embedding per channel.
* :class:`SpatialTransformer`: the shared ``TransformerBlock`` (built from the workload's
  ``cfg.block_spec(channels)``, with cross-attention) on the pixels as tokens.
* :class:`Downsample`, :class:`Upsample`: stride-2 conv; nearest x2 then conv.

Convolutions pad explicitly (:class:`PaddedConv2D`): Keras' "same" pads a stride-2 conv of an
even input on the bottom/right only, where PyTorch's ``padding=1`` pads both sides. Norm
epsilons and groups are always passed: the frameworks' defaults differ.
"""

from __future__ import annotations

import dataclasses
import math

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
from keras import ops

from mlperf_tutor.layers.spec import BlockSpec
from mlperf_tutor.layers.tf.block import TransformerBlock, block_spec_from_config


def timestep_sinusoid(timesteps, dim: int):
    """Sinusoidal embedding of integer timesteps, cosines first (SD 2's ``flip_sin_to_cos``).

    ``freqs = exp(-ln(10000) * arange(dim / 2) / (dim / 2))``, all in float32;
    ``args = t * freqs``; returns ``concat([cos(args), sin(args)])``.

    Args:
        timesteps: (B,) integers.
        dim: embedding width, even.

    Returns:
        (B, dim) float32.
    """
    if dim % 2:
        raise ValueError(f"timestep_sinusoid needs an even width, got {dim}")
    half = dim // 2
    exponent = ops.arange(half, dtype="float32") * -math.log(10000.0) / half  # (dim/2,)
    args = ops.cast(timesteps, "float32")[:, None] * ops.exp(exponent)[None, :]  # (B, dim/2)
    return ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)  # (B, dim)


def _dense(units: int, name: str, dtype) -> keras.layers.Dense:
    # Zeros: the weights come from load_canonical (see layers/tf/lora.py).
    return keras.layers.Dense(units, kernel_initializer="zeros", name=name, dtype=dtype)


def _group_norm(groups: int, eps: float, name: str, dtype) -> keras.layers.GroupNormalization:
    return keras.layers.GroupNormalization(
        groups=groups, axis=-1, epsilon=eps, name=name, dtype=dtype
    )


class PaddedConv2D(keras.layers.Conv2D):
    """A channels-last Conv2D that zero-pads ``padding`` pixels on every side, then convolves
    with "valid" padding: PyTorch's ``Conv2d(padding=p)`` (a Conv2D, so the adapter's rule maps
    its HWIO kernel to OIHW).

    Args:
        filters: output channels.
        kernel_size: square kernel side.
        strides: the stride on both spatial axes.
        padding: zero pixels added on each side (an int, not Keras' "same"/"valid").
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(
        self, filters: int, kernel_size: int, *, strides: int = 1, padding: int = 0, **kwargs
    ):
        super().__init__(
            filters,
            kernel_size,
            strides=strides,
            padding="valid",
            data_format="channels_last",
            kernel_initializer="zeros",
            **kwargs,
        )
        self.pad = int(padding)

    def call(self, x):
        if self.pad:
            p = self.pad
            x = ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])  # (B, H + 2p, W + 2p, C)
        return super().call(x)

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("padding")
        return {**config, "padding": self.pad}


class TimestepEmbedding(keras.layers.Layer):
    """``linear_2(silu(linear_1(x)))``: the timestep sinusoid to the blocks' embedding width.

    Args:
        dim: output width (4 * model channels in SD).
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (B, C0) -> (B, dim).
    """

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.linear_1 = _dense(dim, "linear_1", self.dtype_policy)
        self.linear_2 = _dense(dim, "linear_2", self.dtype_policy)

    def call(self, x):
        return self.linear_2(ops.silu(self.linear_1(x)))


class ResnetBlock(keras.layers.Layer):
    """Residual block with a timestep embedding:
    ``h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))`` (per channel);
    ``out = shortcut(x) + conv2(silu(norm2(h)))``, the shortcut a 1x1 ``conv_shortcut`` when the
    width changes, else the identity. No dropout (the reference's rate is 0).

    Args:
        n_in: input channels.
        n_out: output channels.
        groups: GroupNorm groups.
        eps: GroupNorm epsilon.
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (B, H, W, n_in); temb: (B, E). Output (B, H, W, n_out).
    """

    def __init__(self, n_in: int, n_out: int, *, groups: int, eps: float, **kwargs):
        super().__init__(**kwargs)
        dtype = self.dtype_policy
        self.norm1 = _group_norm(groups, eps, "norm1", dtype)
        self.conv1 = PaddedConv2D(n_out, 3, padding=1, name="conv1", dtype=dtype)
        self.time_emb_proj = _dense(n_out, "time_emb_proj", dtype)
        self.norm2 = _group_norm(groups, eps, "norm2", dtype)
        self.conv2 = PaddedConv2D(n_out, 3, padding=1, name="conv2", dtype=dtype)
        self.conv_shortcut = None
        if n_in != n_out:
            self.conv_shortcut = PaddedConv2D(n_out, 1, name="conv_shortcut", dtype=dtype)

    def call(self, x, temb):
        h = self.conv1(ops.silu(self.norm1(x)))  # (B, H, W, n_out)
        h = h + self.time_emb_proj(ops.silu(temb))[:, None, None, :]
        h = self.conv2(ops.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class SpatialTransformer(keras.layers.Layer):
    """Transformer over the pixels of a feature map, with cross-attention to a context:
    GroupNorm, ``proj_in``, ``depth`` :class:`TransformerBlock` s built from ``spec`` (SD:
    pre-LN, self-attention, cross-attention, GEGLU MLP), ``proj_out``, plus the input.

    Args:
        spec: the blocks' spec (``cfg.block_spec(channels)``); its width D is the channels C.
        depth: transformer blocks.
        groups: GroupNorm groups.
        norm_eps: the GroupNorm's epsilon.
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (B, H, W, C); context: (B, L, context_dim). Output (B, H, W, C).
    """

    def __init__(self, spec: BlockSpec, *, depth: int, groups: int, norm_eps: float, **kwargs):
        super().__init__(**kwargs)
        self.spec, self.depth, self.groups, self.norm_eps = spec, depth, groups, norm_eps
        dtype = self.dtype_policy
        self.norm = _group_norm(groups, norm_eps, "norm", dtype)
        self.proj_in = _dense(spec.dim, "proj_in", dtype)
        self.transformer_blocks = [
            TransformerBlock(spec, name=f"transformer_blocks.{k}", dtype=dtype)
            for k in range(depth)
        ]
        self.proj_out = _dense(spec.dim, "proj_out", dtype)

    def call(self, x, context, training=False):
        b, height, width, c = ops.shape(x)
        # Channels-last already: tokens are the pixels in row-major (h, w) order.
        h = ops.reshape(self.norm(x), (b, height * width, c))  # (B, H W, C)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context=context, training=training)  # (B, H W, C)
        h = ops.reshape(self.proj_out(h), (b, height, width, c))  # (B, H, W, C)
        return h + x

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "spec": dataclasses.asdict(self.spec),
            "depth": self.depth,
            "groups": self.groups,
            "norm_eps": self.norm_eps,
        }

    @classmethod
    def from_config(cls, config: dict) -> SpatialTransformer:
        return super().from_config({**config, "spec": block_spec_from_config(config["spec"])})


class Downsample(keras.layers.Layer):
    """A 3x3 ``conv`` with stride 2 and one pixel of zeros on every side: (H, W) -> (H/2, W/2).

    Args:
        ch: channels in and out.
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(self, ch: int, **kwargs):
        super().__init__(**kwargs)
        self.conv = PaddedConv2D(ch, 3, strides=2, padding=1, name="conv", dtype=self.dtype_policy)

    def call(self, x):
        return self.conv(x)  # (B, H/2, W/2, C)


class Upsample(keras.layers.Layer):
    """Nearest-neighbour x2 (each pixel repeated 2x2), then a 3x3 ``conv`` with padding 1.

    Args:
        ch: channels in and out.
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(self, ch: int, **kwargs):
        super().__init__(**kwargs)
        self.conv = PaddedConv2D(ch, 3, padding=1, name="conv", dtype=self.dtype_policy)

    def call(self, x):
        x = ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)  # (B, 2H, 2W, C)
        return self.conv(x)

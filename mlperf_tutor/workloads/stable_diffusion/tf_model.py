"""The Stable Diffusion v2 UNet and its v-prediction loss in Keras 3 / TensorFlow (MLPerf
``stable_diffusion``).

References: Rombach et al. 2022, latent diffusion (https://arxiv.org/abs/2112.10752) as
mlcommons/training ``stable_diffusion`` trains it (ldm ``openaimodel.UNetModel``); names follow
diffusers' ``UNet2DConditionModel``. The forward is specified in
``workloads/stable_diffusion/__init__.py``; the block layout comes from ``plan.unet_plan``;
attribute names (and Keras ``name=``) are the canonical names. Batches and outputs are NCHW, as in
PyTorch; inside, the model computes channels-last (NHWC), the layout Keras' convolutions and
GroupNormalization take on every backend.
"""

from __future__ import annotations

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
import numpy as np
from keras import ops

from mlperf_tutor.layers.tf.conv import (
    Downsample,
    PaddedConv2D,
    ResnetBlock,
    SpatialTransformer,
    TimestepEmbedding,
    Upsample,
    timestep_sinusoid,
)
from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig
from mlperf_tutor.workloads.stable_diffusion.diffusion import schedule
from mlperf_tutor.workloads.stable_diffusion.plan import Level, unet_plan


def _resnets(cfg: StableDiffusionConfig, level: Level, dtype) -> list[ResnetBlock]:
    return [
        ResnetBlock(
            n_in,
            n_out,
            groups=cfg.norm_groups,
            eps=cfg.resnet_eps,
            name=f"resnets.{j}",
            dtype=dtype,
        )
        for j, (n_in, n_out) in enumerate(level.resnets)
    ]


def _transformer(cfg: StableDiffusionConfig, ch: int, name: str, dtype) -> SpatialTransformer:
    # Its heads are cfg.block_spec(ch)'s ch / head_channels, the plan's heads of this width.
    return SpatialTransformer(
        cfg.block_spec(ch),
        depth=cfg.transformer_depth,
        groups=cfg.norm_groups,
        norm_eps=cfg.transformer_norm_eps,
        name=name,
        dtype=dtype,
    )


def _attentions(cfg: StableDiffusionConfig, level: Level, dtype) -> list[SpatialTransformer]:
    if not level.heads:
        return []
    return [
        _transformer(cfg, n_out, f"attentions.{j}", dtype)
        for j, (_, n_out) in enumerate(level.resnets)
    ]


class DownBlock(keras.layers.Layer):
    """Residual blocks (each followed by a spatial transformer when ``level.heads``), then an
    optional stride-2 ``downsamplers.0``. Returns the output and the list of every inner output
    (the skips), instead of appending to a list argument: Keras' ``__call__`` hands ``call`` a
    copy of its list arguments.

    Args:
        cfg: the Stable Diffusion config.
        level: this block's entry of the plan.
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(self, cfg: StableDiffusionConfig, level: Level, **kwargs):
        super().__init__(**kwargs)
        dtype = self.dtype_policy
        self.resnets = _resnets(cfg, level, dtype)
        self.attentions = _attentions(cfg, level, dtype)
        width = level.resnets[-1][1]
        self.downsamplers = (
            [Downsample(width, name="downsamplers.0", dtype=dtype)] if level.resample else []
        )

    def call(self, h, temb, context, training=False):
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)  # (B, H, W, C)
            if self.attentions:
                h = self.attentions[j](h, context, training=training)
            skips.append(h)
        if self.downsamplers:
            h = self.downsamplers[0](h)  # (B, H/2, W/2, C)
            skips.append(h)
        return h, skips


class MidBlock(keras.layers.Layer):
    """Residual block, spatial transformer, residual block at the last level's width.

    Args:
        cfg: the Stable Diffusion config.
        width: channels.
        heads: the transformer's heads (the plan's; ``cfg.block_spec(width)`` has the same).
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(self, cfg: StableDiffusionConfig, width: int, heads: int, **kwargs):
        super().__init__(**kwargs)
        dtype = self.dtype_policy
        self.resnets = _resnets(cfg, Level(((width, width), (width, width)), heads, False), dtype)
        self.attentions = [_transformer(cfg, width, "attentions.0", dtype)]

    def call(self, h, temb, context, training=False):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context, training=training)
        return self.resnets[1](h, temb)


class UpBlock(keras.layers.Layer):
    """Residual blocks that each first concatenate the latest skip on the channel axis (each
    followed by a spatial transformer when ``level.heads``), then an optional nearest x2
    ``upsamplers.0``. ``skips`` holds one skip per residual block, latest first.

    Args:
        cfg: the Stable Diffusion config.
        level: this block's entry of the plan.
        **kwargs: Keras layer arguments (``name``, ``dtype``).
    """

    def __init__(self, cfg: StableDiffusionConfig, level: Level, **kwargs):
        super().__init__(**kwargs)
        dtype = self.dtype_policy
        self.resnets = _resnets(cfg, level, dtype)
        self.attentions = _attentions(cfg, level, dtype)
        width = level.resnets[-1][1]
        self.upsamplers = (
            [Upsample(width, name="upsamplers.0", dtype=dtype)] if level.resample else []
        )

    def call(self, h, skips, temb, context, training=False):
        for j, resnet in enumerate(self.resnets):
            h = resnet(ops.concatenate([h, skips[j]], axis=-1), temb)  # (B, H, W, C + C_skip) in
            if self.attentions:
                h = self.attentions[j](h, context, training=training)
        if self.upsamplers:
            h = self.upsamplers[0](h)  # (B, 2H, 2W, C)
        return h


class UNet(keras.Model):
    """The SD v2 text-conditioned UNet with its v-prediction training loss.

    The call takes a batch dict with ``latents`` and ``noise`` (B, 4, h, w), ``timesteps`` (B,)
    and ``context`` (B, L, context_dim); it returns ``{"prediction": (B, 4, h, w), "loss": ()}``,
    the v estimate at x_t and its mean squared error to the target v (in float32).

    Args:
        cfg: the Stable Diffusion config.
        dtype: variable and compute dtype of every layer ("float32"; "bfloat16" works too).
    """

    def __init__(self, cfg: StableDiffusionConfig, *, dtype: str = "float32", **kwargs):
        # autocast=False: Keras would cast the batch's float inputs to a mixed policy's compute
        # dtype (bfloat16) on the way in; the noisy latents and the v target are float32 math
        # here, and denoise casts its input itself. The layers inside still autocast.
        super().__init__(dtype=dtype, autocast=False, **kwargs)
        self.cfg = cfg
        plan, c0 = unet_plan(cfg), cfg.model_channels
        tables = schedule(cfg)
        # float32 constants, no weights of the checkpoint (the private name keeps them out).
        self._sqrt_a = np.asarray(tables.sqrt_alphas_cumprod, np.float32)
        self._sqrt_1ma = np.asarray(tables.sqrt_one_minus_alphas_cumprod, np.float32)
        self.time_embedding = TimestepEmbedding(cfg.time_dim, name="time_embedding", dtype=dtype)
        self.conv_in = PaddedConv2D(c0, 3, padding=1, name="conv_in", dtype=dtype)
        self.down_blocks = [
            DownBlock(cfg, level, name=f"down_blocks.{i}", dtype=dtype)
            for i, level in enumerate(plan.down)
        ]
        self.mid_block = MidBlock(
            cfg, plan.mid_width, plan.mid_heads, name="mid_block", dtype=dtype
        )
        self.up_blocks = [
            UpBlock(cfg, level, name=f"up_blocks.{i}", dtype=dtype)
            for i, level in enumerate(plan.up)
        ]
        self.conv_norm_out = keras.layers.GroupNormalization(
            groups=cfg.norm_groups,
            axis=-1,
            epsilon=cfg.resnet_eps,
            name="conv_norm_out",
            dtype=dtype,
        )
        self.conv_out = PaddedConv2D(
            cfg.latent_channels, 3, padding=1, name="conv_out", dtype=dtype
        )

    def denoise(self, x, timesteps, context, training=False):
        """The UNet alone: v estimate (B, 4, h, w) at x_t (B, 4, h, w), timesteps (B,) and
        context (B, L, context_dim), NCHW in and out, in the model's compute dtype."""
        dtype = self.compute_dtype
        h = ops.transpose(ops.cast(x, dtype), (0, 2, 3, 1))  # (B, h, w, 4)
        context = ops.cast(context, dtype)
        sinusoid = timestep_sinusoid(timesteps, self.cfg.model_channels)  # (B, C0) float32
        temb = self.time_embedding(ops.cast(sinusoid, dtype))  # (B, 4 C0)
        h = self.conv_in(h)  # (B, h, w, C0)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context, training=training)
            skips += block_skips
        h = self.mid_block(h, temb, context, training=training)
        for block in self.up_blocks:
            latest = [skips.pop() for _ in block.resnets]
            h = block(h, latest, temb, context, training=training)
        out = self.conv_out(ops.silu(self.conv_norm_out(h)))  # (B, h, w, 4)
        return ops.transpose(out, (0, 3, 1, 2))  # (B, 4, h, w)

    def call(self, batch, training=False):
        latents = ops.cast(batch["latents"], "float32")  # (B, 4, h, w)
        noise = ops.cast(batch["noise"], "float32")
        t = batch["timesteps"]  # (B,)
        a = ops.take(self._sqrt_a, t)[:, None, None, None]  # (B, 1, 1, 1)
        s = ops.take(self._sqrt_1ma, t)[:, None, None, None]
        x_t = a * latents + s * noise
        target = a * noise - s * latents  # v
        prediction = ops.cast(self.denoise(x_t, t, batch["context"], training=training), "float32")
        return {"prediction": prediction, "loss": ops.mean(ops.square(prediction - target))}

    def get_config(self) -> dict:
        return {"cfg": self.cfg.to_dict(), "dtype": self.dtype_policy.name, "name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> UNet:
        cfg = StableDiffusionConfig(**config["cfg"])
        return cls(cfg, dtype=config["dtype"], name=config["name"])


def dummy_batch(cfg: StableDiffusionConfig, batch_size: int = 1) -> dict:
    """Zeros with the batch's keys, shapes and dtypes: one call creates every variable."""
    size = cfg.latent_size
    latents = np.zeros((batch_size, cfg.latent_channels, size, size), np.float32)
    return {
        "latents": latents,
        "noise": latents,
        "timesteps": np.zeros((batch_size,), np.int32),
        "context": np.zeros((batch_size, cfg.context_len, cfg.context_dim), np.float32),
    }


def build(cfg: StableDiffusionConfig, *, dtype: str = "float32") -> UNet:
    """A UNet with every variable created (zeros), ready for ``load_canonical``.

    Args:
        cfg: the Stable Diffusion config.
        dtype: a Keras dtype policy: "float32" (parity), "mixed_bfloat16" (bf16 training:
            float32 variables, bfloat16 compute) or "bfloat16".
    """
    model = UNet(cfg, dtype=dtype, name="unet")
    model(dummy_batch(cfg), training=False)
    return model

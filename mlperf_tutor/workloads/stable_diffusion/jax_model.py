"""The Stable Diffusion v2 UNet and its v-prediction loss in Flax NNX (MLPerf ``stable_diffusion``).

References: Rombach et al. 2022, latent diffusion (https://arxiv.org/abs/2112.10752) as
mlcommons/training ``stable_diffusion`` trains it (ldm ``openaimodel.UNetModel``); v-prediction,
Salimans & Ho 2022 (https://arxiv.org/abs/2202.00512); names follow diffusers'
``UNet2DConditionModel``. The block layout comes from ``plan.unet_plan``; attribute names equal
the PyTorch and Keras models', and the adapter's layout rules give the canonical names
(``shapes.canonical_shapes``). Batches and outputs are NCHW as the canonical layout; inside, the
UNet runs in NHWC (XLA's native conv layout), transposed once at entry and exit. Letters: B batch,
C channels, h/w latent height/width, L context tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlperf_tutor.frameworks.jax import init_empty
from mlperf_tutor.layers.jax.conv import (
    Downsample,
    ResnetBlock,
    SpatialTransformer,
    TimestepEmbedding,
    Upsample,
    conv3x3,
    group_norm,
    timestep_sinusoid,
)
from mlperf_tutor.layers.spec import BlockSpec
from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig
from mlperf_tutor.workloads.stable_diffusion.diffusion import schedule
from mlperf_tutor.workloads.stable_diffusion.plan import Level, unet_plan

Array = jax.Array
SpecOf = Callable[[int], BlockSpec]  # channels C -> the spatial transformers' blocks


class _Blocks(nnx.Module):
    """Residual blocks of ``level`` and their spatial transformers (an empty list without
    heads), shared by the down, middle and up blocks; ``spec_of(C)`` gives the transformer
    blocks over C channels."""

    def __init__(
        self, cfg: StableDiffusionConfig, level: Level, spec_of: SpecOf, *, rngs: nnx.Rngs
    ):
        self.resnets = nnx.List(
            ResnetBlock(
                n_in, n_out, cfg.time_dim, groups=cfg.norm_groups, eps=cfg.resnet_eps, rngs=rngs
            )
            for n_in, n_out in level.resnets
        )
        self.attentions = nnx.List(
            _transformer(cfg, spec_of(n_out), rngs=rngs)
            for _, n_out in level.resnets
            if level.heads
        )


def _transformer(
    cfg: StableDiffusionConfig, spec: BlockSpec, *, rngs: nnx.Rngs
) -> SpatialTransformer:
    return SpatialTransformer(
        spec,
        depth=cfg.transformer_depth,
        groups=cfg.norm_groups,
        norm_eps=cfg.transformer_norm_eps,
        rngs=rngs,
    )


class DownBlock(_Blocks):
    """Residual blocks (each followed by a spatial transformer when ``level.heads``), then an
    optional stride-2 ``downsamplers.0``; every inner output is kept as a skip."""

    def __init__(
        self, cfg: StableDiffusionConfig, level: Level, spec_of: SpecOf, *, rngs: nnx.Rngs
    ):
        super().__init__(cfg, level, spec_of, rngs=rngs)
        width = level.resnets[-1][1]
        self.downsamplers = nnx.List([Downsample(width, rngs=rngs)] if level.resample else [])

    def __call__(self, h: Array, temb: Array, context: Array, skips: list[Array]) -> Array:
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)  # (B, H, W, C)
            if self.attentions:
                h = self.attentions[j](h, context)
            skips.append(h)
        if self.downsamplers:
            h = self.downsamplers[0](h)  # (B, H/2, W/2, C)
            skips.append(h)
        return h


class MidBlock(_Blocks):
    """Residual block, spatial transformer, residual block at the last level's width."""

    def __init__(self, cfg: StableDiffusionConfig, width: int, spec_of: SpecOf, *, rngs: nnx.Rngs):
        level = Level(((width, width), (width, width)), 0, False)
        super().__init__(cfg, level, spec_of, rngs=rngs)
        # One transformer, even where the last level has none (its heads: plan.mid_heads).
        self.attentions = nnx.List([_transformer(cfg, spec_of(width), rngs=rngs)])

    def __call__(self, h: Array, temb: Array, context: Array) -> Array:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UpBlock(_Blocks):
    """Residual blocks that each first concatenate the latest skip on the channel axis (each
    followed by a spatial transformer when ``level.heads``), then an optional nearest x2
    ``upsamplers.0``."""

    def __init__(
        self, cfg: StableDiffusionConfig, level: Level, spec_of: SpecOf, *, rngs: nnx.Rngs
    ):
        super().__init__(cfg, level, spec_of, rngs=rngs)
        width = level.resnets[-1][1]
        self.upsamplers = nnx.List([Upsample(width, rngs=rngs)] if level.resample else [])

    def __call__(self, h: Array, temb: Array, context: Array, skips: list[Array]) -> Array:
        for j, resnet in enumerate(self.resnets):
            h = resnet(jnp.concatenate([h, skips.pop()], axis=-1), temb)  # (B, H, W, C + C_skip)
            if self.attentions:
                h = self.attentions[j](h, context)
        if self.upsamplers:
            h = self.upsamplers[0](h)  # (B, 2H, 2W, C)
        return h


class UNet(nnx.Module):
    """The SD v2 text-conditioned UNet with its v-prediction training loss.

    Takes a batch dict with ``latents`` and ``noise`` (B, 4, h, w), ``timesteps`` (B,) and
    ``context`` (B, L, context_dim); returns ``{"prediction": (B, 4, h, w), "loss": ()}``, the
    v estimate at ``x_t = a latents + s noise`` and its mean squared error to the target
    ``v = a noise - s latents`` (float32), with ``a``, ``s`` the float32 square roots of
    ``alphas_cumprod[t]`` and ``1 - alphas_cumprod[t]`` (``diffusion.schedule``).

    Args:
        cfg: the Stable Diffusion config.
        fused: ``jax.nn.dot_product_attention`` in every attention (GPU benchmarks).
        fused_implementation: its implementation, "xla" or "cudnn"; None: cuDNN for bf16/fp16
            on GPU, XLA otherwise (see :class:`~mlperf_tutor.layers.jax.attention.Attention`).
        rngs: initialisers' keys.
    """

    def __init__(
        self,
        cfg: StableDiffusionConfig,
        *,
        fused: bool = False,
        fused_implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        plan, c0 = unet_plan(cfg), cfg.model_channels

        def spec_of(channels: int) -> BlockSpec:
            return cfg.block_spec(channels).with_fused(
                fused, fused_implementation, kernel_has_dropout=False
            )

        self.cfg = cfg  # static: the schedule tables are built from it at trace time
        self.time_embedding = TimestepEmbedding(c0, cfg.time_dim, rngs=rngs)
        self.conv_in = conv3x3(cfg.latent_channels, c0, rngs=rngs)
        self.down_blocks = nnx.List(DownBlock(cfg, lvl, spec_of, rngs=rngs) for lvl in plan.down)
        self.mid_block = MidBlock(cfg, plan.mid_width, spec_of, rngs=rngs)
        self.up_blocks = nnx.List(UpBlock(cfg, lvl, spec_of, rngs=rngs) for lvl in plan.up)
        self.conv_norm_out = group_norm(c0, cfg.norm_groups, cfg.resnet_eps, rngs=rngs)
        self.conv_out = conv3x3(c0, cfg.latent_channels, rngs=rngs)

    def denoise(self, x: Array, timesteps: Array, context: Array) -> Array:
        """The UNet alone: v estimate (B, 4, h, w) at x_t (B, 4, h, w), timesteps (B,) and
        context (B, L, context_dim), in the weights' dtype."""
        # Inputs in the weights' dtype: Flax layers promote, so float32 inputs would turn a
        # bf16 model back into float32 arithmetic.
        dtype = self.conv_in.kernel.dtype
        x = jnp.transpose(jnp.asarray(x, dtype), (0, 2, 3, 1))  # NCHW -> (B, h, w, 4)
        context = jnp.asarray(context, dtype)
        sinusoid = timestep_sinusoid(jnp.asarray(timesteps), self.cfg.model_channels)
        temb = self.time_embedding(sinusoid.astype(dtype))  # (B, 4 C0)
        h = self.conv_in(x)  # (B, h, w, C0)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, context, skips)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            h = block(h, temb, context, skips)
        out = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))  # (B, h, w, 4)
        return jnp.transpose(out, (0, 3, 1, 2))  # (B, 4, h, w)

    def __call__(self, batch: dict[str, Array]) -> dict[str, Array]:
        latents = batch["latents"].astype(jnp.float32)  # (B, 4, h, w)
        noise = batch["noise"].astype(jnp.float32)
        t = batch["timesteps"]  # (B,)
        tables = schedule(self.cfg)
        a = jnp.asarray(tables.sqrt_alphas_cumprod, jnp.float32)[t][:, None, None, None]
        s = jnp.asarray(tables.sqrt_one_minus_alphas_cumprod, jnp.float32)[t][:, None, None, None]
        x_t = a * latents + s * noise
        target = a * noise - s * latents  # v
        prediction = self.denoise(x_t, t, batch["context"])
        loss = jnp.mean((prediction.astype(jnp.float32) - target) ** 2)
        return {"prediction": prediction, "loss": loss}


def build(
    cfg: StableDiffusionConfig,
    *,
    fused: bool = False,
    fused_implementation: str | None = None,
    dtype: Any = jnp.float32,
) -> UNet:
    """A UNet with zero weights; the workload loads them (``load_canonical``).

    Args:
        cfg: the Stable Diffusion config.
        fused: fused attention (see :class:`UNet`).
        fused_implementation: "xla", "cudnn" or None (see :class:`UNet`).
        dtype: dtype of every weight, e.g. ``jnp.bfloat16`` for a GPU benchmark (the inputs are
            cast to it; the loss stays float32); allocated in that dtype directly.
    """
    dtype = jnp.dtype(dtype)

    def make() -> UNet:
        model = UNet(cfg, fused=fused, fused_implementation=fused_implementation, rngs=nnx.Rngs(0))
        # Under init_empty's abstract trace: only the dtype changes, nothing is allocated.
        for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            var.set_value(var.get_value().astype(dtype))
        return model

    return init_empty(make)

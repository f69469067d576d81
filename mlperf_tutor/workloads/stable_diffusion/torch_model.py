"""The Stable Diffusion v2 UNet and its v-prediction loss in PyTorch (MLPerf ``stable_diffusion``).

References: Rombach et al. 2022, latent diffusion (https://arxiv.org/abs/2112.10752) as
mlcommons/training ``stable_diffusion`` trains it (ldm ``openaimodel.UNetModel``); names follow
diffusers' ``UNet2DConditionModel``. The block layout comes from ``plan.unet_plan``; attribute
names are the canonical names (``shapes.canonical_shapes``). The forward::

    x_t = a_t latents + s_t noise;  v = a_t noise - s_t latents    (diffusion.schedule)
    temb = time_embedding(sinusoid(t));  h = conv_in(x_t)
    h = up_blocks(mid_block(down_blocks(h, temb, context)), skips)
    prediction = conv_out(silu(conv_norm_out(h)));  loss = mean((prediction - v) ** 2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlperf_tutor.layers.torch.conv import (
    Downsample,
    ResnetBlock,
    SpatialTransformer,
    TimestepEmbedding,
    Upsample,
    timestep_sinusoid,
)
from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig
from mlperf_tutor.workloads.stable_diffusion.diffusion import schedule
from mlperf_tutor.workloads.stable_diffusion.plan import Level, unet_plan


def _blocks(cfg: StableDiffusionConfig, level: Level, fused: bool):
    """The residual blocks of ``level`` and its spatial transformers (empty without heads)."""
    resnets = [
        ResnetBlock(n_in, n_out, time_dim=cfg.time_dim, groups=cfg.norm_groups, eps=cfg.resnet_eps)
        for n_in, n_out in level.resnets
    ]
    attentions = [_transformer(cfg, n_out, fused) for _, n_out in level.resnets if level.heads]
    return nn.ModuleList(resnets), nn.ModuleList(attentions)


def _transformer(cfg: StableDiffusionConfig, ch: int, fused: bool) -> SpatialTransformer:
    """A spatial transformer over ``ch`` channels (its heads: ch / cfg.head_channels)."""
    return SpatialTransformer(
        cfg.block_spec(ch).with_fused(fused),
        depth=cfg.transformer_depth,
        groups=cfg.norm_groups,
        norm_eps=cfg.transformer_norm_eps,
    )


class DownBlock(nn.Module):
    """Residual blocks (each followed by a spatial transformer when ``level.heads``), then an
    optional stride-2 ``downsamplers.0``; every inner output is kept as a skip."""

    def __init__(self, cfg: StableDiffusionConfig, level: Level, *, fused: bool = False):
        super().__init__()
        self.resnets, self.attentions = _blocks(cfg, level, fused)
        width = level.resnets[-1][1]
        self.downsamplers = nn.ModuleList([Downsample(width)] if level.resample else [])

    def forward(self, h, temb, context, skips: list[torch.Tensor]) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[j](h, context)
            skips.append(h)
        if self.downsamplers:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h


class MidBlock(nn.Module):
    """Residual block, spatial transformer, residual block at the last level's width."""

    def __init__(self, cfg: StableDiffusionConfig, width: int, heads: int, *, fused: bool = False):
        super().__init__()
        level = Level(((width, width), (width, width)), heads, False)
        self.resnets, _ = _blocks(cfg, level, fused)
        self.attentions = nn.ModuleList([_transformer(cfg, width, fused)])

    def forward(self, h, temb, context) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UpBlock(nn.Module):
    """Residual blocks that each first concatenate the latest skip on the channel axis (each
    followed by a spatial transformer when ``level.heads``), then an optional nearest x2
    ``upsamplers.0``."""

    def __init__(self, cfg: StableDiffusionConfig, level: Level, *, fused: bool = False):
        super().__init__()
        self.resnets, self.attentions = _blocks(cfg, level, fused)
        width = level.resnets[-1][1]
        self.upsamplers = nn.ModuleList([Upsample(width)] if level.resample else [])

    def forward(self, h, temb, context, skips: list[torch.Tensor]) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)  # (B, C + C_skip, H, W) in
            if self.attentions:
                h = self.attentions[j](h, context)
        if self.upsamplers:
            h = self.upsamplers[0](h)
        return h


class UNet(nn.Module):
    """The SD v2 text-conditioned UNet with its v-prediction training loss.

    Takes a batch dict with ``latents`` and ``noise`` (B, 4, h, w), ``timesteps`` (B,) and
    ``context`` (B, L, context_dim); returns ``{"prediction": (B, 4, h, w), "loss": ()}``, the
    v estimate at x_t and its mean squared error to the target v (in float32).

    Args:
        cfg: the Stable Diffusion config.
        fused: ``F.scaled_dot_product_attention`` in every attention (GPU benchmarks).
    """

    def __init__(self, cfg: StableDiffusionConfig, *, fused: bool = False):
        super().__init__()
        plan, c0 = unet_plan(cfg), cfg.model_channels
        self.cfg = cfg  # the workload's evaluation samples with the model's own config
        self.model_channels = c0
        tables = schedule(cfg)
        # Plain float32 tensors, not buffers: ``.to(bfloat16)`` must not round them, and they
        # are no weights of the checkpoint. On the CPU even inside build's meta-device scope.
        self._sqrt_a = torch.tensor(tables.sqrt_alphas_cumprod, dtype=torch.float32, device="cpu")
        self._sqrt_1ma = torch.tensor(
            tables.sqrt_one_minus_alphas_cumprod, dtype=torch.float32, device="cpu"
        )
        self.time_embedding = TimestepEmbedding(c0, cfg.time_dim)
        self.conv_in = nn.Conv2d(cfg.latent_channels, c0, 3, padding=1)
        self.down_blocks = nn.ModuleList([DownBlock(cfg, lvl, fused=fused) for lvl in plan.down])
        self.mid_block = MidBlock(cfg, plan.mid_width, plan.mid_heads, fused=fused)
        self.up_blocks = nn.ModuleList([UpBlock(cfg, lvl, fused=fused) for lvl in plan.up])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, c0, eps=cfg.resnet_eps, affine=True)
        self.conv_out = nn.Conv2d(c0, cfg.latent_channels, 3, padding=1)

    def denoise(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The UNet alone: v estimate (B, 4, h, w) at x_t (B, 4, h, w), timesteps (B,) and
        context (B, L, context_dim), in the model's dtype."""
        dtype = self.conv_in.weight.dtype
        x, context = x.to(dtype), context.to(dtype)
        temb = self.time_embedding(timestep_sinusoid(timesteps, self.model_channels).to(dtype))
        h = self.conv_in(x)  # (B, C0, h, w)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, context, skips)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            h = block(h, temb, context, skips)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latents, noise = batch["latents"].float(), batch["noise"].float()  # (B, 4, h, w)
        t = batch["timesteps"].long()  # (B,)
        a = self._sqrt_a.to(t.device)[t][:, None, None, None]  # (B, 1, 1, 1)
        s = self._sqrt_1ma.to(t.device)[t][:, None, None, None]
        x_t = a * latents + s * noise
        target = a * noise - s * latents  # v
        prediction = self.denoise(x_t, t, batch["context"])
        loss = F.mse_loss(prediction.float(), target)
        return {"prediction": prediction.float(), "loss": loss}


def build(cfg: StableDiffusionConfig, *, fused: bool = False) -> UNet:
    """A float32 UNet with uninitialised weights (the workload loads them), built on the meta
    device so no time goes into random initialisation."""
    with torch.device("meta"):
        model = UNet(cfg, fused=fused)
    return model.to_empty(device="cpu").to(torch.float32)

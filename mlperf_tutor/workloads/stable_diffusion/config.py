"""Config of SD v2 UNet training (MLPerf Training ``stable_diffusion``), framework-free.

Model: the latent-diffusion UNet of Rombach et al. 2022 (https://arxiv.org/abs/2112.10752) as
the MLPerf reference configures it (mlcommons/training ``stable_diffusion/configs/
train_32x08x08.yaml``: model_channels 320, channel_mult [1, 2, 4, 4], 2 residual blocks per
level, spatial transformers of depth 1 with 64-channel heads and linear in/out projections at
attention_resolutions [4, 2, 1], context_dim 1024, 4x64x64 latents). Objective: v-prediction
(Salimans & Ho 2022, https://arxiv.org/abs/2202.00512) with 1000 DDPM steps and the scaled-linear
betas from 0.00085 to 0.012; latents are VAE samples times 0.18215. Optimizer: AdamW, lr
1.25e-7 x global batch size, LambdaLinearScheduler warmup from 1e-6 of the rate over 1000
steps. Evaluation: DDIM, 50 steps, guidance scale 8, eta 0 on COCO-2014 captions; MLPerf v4.0
targets FID <= 90 and CLIP score >= 0.15.
"""

from __future__ import annotations

import dataclasses

from mlperf_tutor.core.config import NON_NEGATIVE, RATE, Config, ConfigError, Range
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec


@dataclasses.dataclass(frozen=True)
class StableDiffusionConfig(Config):
    """Hyperparameters of the SD v2 UNet, its diffusion objective and its training."""

    # --- UNet ---
    latent_channels: int = 4  # VAE latent channels: the UNet's input and output channels
    latent_size: int = 64  # latent height = width (512 px images / VAE factor 8)
    model_channels: int = 320  # C0: conv_in width; level l has C0 * channel_mult[l]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per level on the way down (num_res_blocks + 1 on the way up)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with spatial transformers
    head_channels: int = 64  # H: attention head width; heads = level channels / H
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    context_dim: int = 1024  # text-encoder width (OpenCLIP ViT-H/14)
    context_len: int = 77  # text tokens
    norm_groups: int = 32  # GroupNorm groups everywhere
    resnet_eps: float = 1e-5  # GroupNorm eps of residual blocks and conv_norm_out
    transformer_norm_eps: float = 1e-6  # GroupNorm eps at a spatial transformer's input
    layer_norm_eps: float = 1e-5  # LayerNorms inside the transformer blocks
    # --- diffusion (DDPM, v-prediction) ---
    num_timesteps: int = 1000
    beta_start: float = 0.00085  # betas = linspace(sqrt(start), sqrt(end), T) ** 2
    beta_end: float = 0.012
    latent_scale: float = 0.18215  # latent = scale * (mean + std * noise) of the VAE moments
    # --- AdamW + LambdaLinearScheduler ---
    lr_per_sample: float = 1.25e-7  # the reference's base_learning_rate, times the batch
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    warmup_init_factor: float = 1e-6  # the warmup starts at this fraction of the rate
    global_batch_size: int = 2048  # the v4.0 reference runs (32 nodes x 8 GPUs x 8)
    # --- evaluation: DDIM samples, scored by FID and CLIP score ---
    sampler_steps: int = 50
    guidance_scale: float = 8.0  # classifier-free guidance; 1.0 disables it
    eval_samples: int = 30000  # COCO-2014 validation captions
    eval_every_samples: int = 512000
    fid_target: float = 90.0  # reached when FID <= fid_target ...
    clip_target: float = 0.15  # ... and CLIP score >= clip_target

    # Fields outside the defaults (ints and tuple entries >= 1, floats > 0; see
    # mlperf_tutor.core.config). The UNet's depths are bounded so that the tensors a config
    # names stay countable (8 levels of 16 blocks of 16 transformer layers: about 50,000).
    RANGES = {
        "num_res_blocks": Range(1, 16),
        "attention_levels": NON_NEGATIVE,
        "transformer_depth": Range(1, 16),
        "num_timesteps": Range(1, 100_000),  # the noise schedule holds arrays of this length
        "beta_start": Range(0, 1, low_open=True, high_open=True),
        "beta_end": Range(0, 1, low_open=True, high_open=True),
        "beta1": RATE,
        "beta2": RATE,
        "weight_decay": NON_NEGATIVE,
        "warmup_steps": NON_NEGATIVE,
        "warmup_init_factor": Range(0, 1, low_open=True),
        "guidance_scale": NON_NEGATIVE,
        "fid_target": NON_NEGATIVE,
        "clip_target": Range(-1, 1),  # a cosine similarity
    }
    LENGTHS = {"channel_mult": Range(1, 8), "attention_levels": Range(0, 8)}

    def check(self):
        widths = [self.model_channels * m for m in self.channel_mult]
        if any(w % self.norm_groups for w in widths):
            raise ConfigError(
                f"every level width {widths} must be divisible by norm_groups ({self.norm_groups})",
                "norm_groups",
            )
        if any(not 0 <= lvl < len(widths) for lvl in self.attention_levels):
            raise ConfigError(
                f"attention_levels {self.attention_levels} must index channel_mult "
                f"(0..{len(widths) - 1})",
                "attention_levels",
            )
        if any(widths[lvl] % self.head_channels for lvl in (*self.attention_levels, -1)):
            raise ConfigError(
                "the widths of the attention levels and of the last level (the middle block's) "
                f"must be divisible by head_channels ({self.head_channels})",
                "head_channels",
            )
        if self.latent_size % 2 ** (len(widths) - 1):
            raise ConfigError(
                f"latent_size ({self.latent_size}) must be divisible by 2**{len(widths) - 1} "
                "(one downsampling per level but the last)",
                "latent_size",
            )
        if not self.beta_start < self.beta_end:
            raise ConfigError("betas need 0 < beta_start < beta_end < 1", "beta_end")
        if self.sampler_steps > self.num_timesteps:
            raise ConfigError(
                f"sampler_steps ({self.sampler_steps}) exceeds num_timesteps "
                f"({self.num_timesteps})",
                "sampler_steps",
            )

    def block_spec(self, channels: int) -> BlockSpec:
        """A transformer block of a spatial transformer over ``channels`` (C) channels: pre-LN,
        self-attention and a cross-attention to the text context with bias-free q/k/v and an
        ``o_proj`` bias, C / head_channels heads, a GEGLU MLP of width 4 C (exact GELU)."""
        attention = AttentionSpec(
            channels, channels // self.head_channels, bias=False, out_bias=True
        )
        return BlockSpec(
            attention=attention,
            mlp=MlpSpec(channels, 4 * channels, activation="gelu", gated=True),
            norm_eps=self.layer_norm_eps,
            norm_position="pre",
            cross_attention=attention.cross(self.context_dim),
        )

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each level: model_channels * channel_mult."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_dim(self) -> int:
        """Width of the timestep embedding (4 * model_channels)."""
        return 4 * self.model_channels

    @property
    def lr(self) -> float:
        """Peak learning rate: lr_per_sample * global_batch_size (2.56e-4 at batch 2048)."""
        return self.lr_per_sample * self.global_batch_size


StableDiffusionConfig.PRESETS = {
    # 8x8 latents, two levels (32 and 64 channels) with attention at both, 8-token 32-wide
    # captions: trains on 2 CPU cores in seconds. Its rate (2e-3 at batch 8) is far above the
    # reference's per-sample 1.25e-7, which would not move a tiny model in a few hundred steps.
    # FID and CLIP score are the stand-ins' (standins.image_features / clip_embeddings): a
    # torch run measured FID 3.3 -> 0.57 -> 0.27 and CLIP 0.23 -> 0.81 -> 0.90 after 80, 160
    # and 240 steps; noise scores FID 5.4, CLIP 0.0; perfect samples FID 0, CLIP 0.99.
    "tiny": dict(
        latent_size=8,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        head_channels=16,
        context_dim=32,
        context_len=8,
        norm_groups=8,
        lr_per_sample=2.5e-4,
        warmup_steps=20,
        global_batch_size=8,
        sampler_steps=10,
        guidance_scale=1.0,
        eval_samples=64,
        eval_every_samples=640,
        fid_target=0.4,
        clip_target=0.85,
    ),
    # The SD v2 layout at 192 channels on 32x32 latents (256 px): one accelerator.
    "small": dict(model_channels=192, latent_size=32, global_batch_size=64),
    "mlperf": {},
}

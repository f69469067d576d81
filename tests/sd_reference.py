"""The reference every Stable Diffusion UNet is checked against: diffusers' own
``UNet2DConditionModel``, built locally from our config and given our canonical weights."""

from __future__ import annotations

import numpy as np

from mlperf_tutor.workloads.stable_diffusion import hf


def random_batch(cfg, batch_size: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    """A batch of normal latents, noise and context (no stand-in encoders), with timesteps
    near both ends of the schedule and in the middle (3, 999, 500)."""
    rng = np.random.default_rng(seed)
    latent = (batch_size, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    context = (batch_size, cfg.context_len, cfg.context_dim)
    return {
        "latents": rng.standard_normal(latent).astype(np.float32),
        "noise": rng.standard_normal(latent).astype(np.float32),
        "timesteps": np.array([3, 999, 500][:batch_size], np.int32),
        "context": rng.standard_normal(context).astype(np.float32),
    }


def diffusers_unet(cfg, tree):
    """A float32 ``UNet2DConditionModel`` of ``cfg`` holding the canonical ``tree``."""
    import diffusers
    import torch

    kwargs = {k: v for k, v in hf.config_to_hf(cfg).items() if not k.startswith("_")}
    model = diffusers.UNet2DConditionModel(**kwargs).eval()
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in hf.to_hf(tree)}
    model.load_state_dict(state, strict=True)
    return model


def diffusers_prediction(cfg, tree, x_t, timesteps, context) -> np.ndarray:
    """diffusers' UNet output (B, C, H, W) for NCHW ``x_t``, (B,) ``timesteps`` and (B, L, D)
    ``context``, in float32 with matmuls at full precision."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    model = diffusers_unet(cfg, tree)
    with torch.no_grad():
        out = model(
            torch.from_numpy(np.asarray(x_t, np.float32)),
            torch.from_numpy(np.asarray(timesteps).astype(np.int64)),
            encoder_hidden_states=torch.from_numpy(np.asarray(context, np.float32)),
        ).sample
    return out.numpy()

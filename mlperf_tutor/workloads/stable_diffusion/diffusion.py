"""The diffusion math of SD v2, framework-free: the latents drawn from the VAE's moments, the
noise schedule, the v-prediction training target and the DDIM sampler used for evaluation.

- Latents: the autoencoder's encoder gives a diagonal Gaussian posterior per image (its
  moments); training draws a new latent from it each time a sample is read, scaled by
  ``cfg.latent_scale``, as ldm's ``DiagonalGaussianDistribution.sample()`` and
  ``get_first_stage_encoding`` do.
- Forward process (DDPM, Ho et al. 2020, https://arxiv.org/abs/2006.11239): with
  ``a_t = alphas_cumprod[t]``, a noisy latent is ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``.
  Betas are ldm's "linear" schedule (diffusers' "scaled_linear"): linear in sqrt(beta).
- Target: the velocity ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` (Salimans & Ho 2022,
  https://arxiv.org/abs/2202.00512), which SD v2 (``parameterization: "v"``) regresses.
- Sampler: deterministic DDIM (eta 0, Song et al. 2021, https://arxiv.org/abs/2010.02502) on the
  "uniform" sub-sequence of timesteps that the MLPerf reference (ldm ``DDIMSampler``) and
  diffusers' ``DDIMScheduler`` with SD2's config ("leading" spacing, ``steps_offset=1``,
  ``set_alpha_to_one=False``) both visit, with classifier-free guidance (Ho & Salimans 2022,
  https://arxiv.org/abs/2207.12598).

The tables are float64 numpy; the models cast them to float32. The sampler loop touches the
framework's arrays only through ``*`` and ``+``/``-`` with python floats, so one loop serves torch
tensors, JAX arrays and TF tensors alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig

# denoise(x, t, conditional) -> v: the UNet at one integer timestep, with the caption's context
# (conditional=True) or the empty caption's (False), on a framework array x.
Denoiser = Callable[[Any, int, bool], Any]
LOGVAR_RANGE = (-30.0, 20.0)  # ldm's DiagonalGaussianDistribution clamps the log-variance


class Schedule(NamedTuple):
    """Noise-schedule tables, each float64 of shape (num_timesteps,), read-only."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray  # a_t = prod_{s <= t} (1 - beta_s)
    sqrt_alphas_cumprod: np.ndarray  # the weight of x0 in x_t
    sqrt_one_minus_alphas_cumprod: np.ndarray  # the weight of the noise in x_t


@functools.lru_cache(maxsize=8)
def _tables(num_timesteps: int, beta_start: float, beta_end: float) -> Schedule:
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    tables = Schedule(betas, alphas_cumprod, np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod))
    for table in tables:
        table.flags.writeable = False  # cached and shared: nobody may edit them in place
    return tables


def schedule(cfg: StableDiffusionConfig) -> Schedule:
    """The scaled-linear DDPM schedule of ``cfg``: betas = linspace(sqrt(start), sqrt(end), T) ** 2.

    Cached (on the three fields it depends on), so calling it per step costs nothing.

    Args:
        cfg: the workload config (``num_timesteps``, ``beta_start``, ``beta_end``).

    Returns:
        The float64 tables, each of shape (num_timesteps,).
    """
    return _tables(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)


def sample_latents(moments: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Draw scaled latents from VAE moments: ``scale * (mean + exp(logvar / 2) * N(0, 1))``.

    The log-variance is clipped to [-30, 20] first, as ldm's ``DiagonalGaussianDistribution``
    does; with ``scale`` 0.18215 this is the reference's ``get_first_stage_encoding``.

    Args:
        moments: (..., 2C, h, w): the C mean channels, then the C log-variance channels.
        rng: the noise source; every call draws new noise.
        scale: the latent scale factor (``cfg.latent_scale``).

    Returns:
        (..., C, h, w) float32 latents.
    """
    moments = np.asarray(moments, np.float32)
    if moments.ndim < 3 or moments.shape[-3] % 2:
        raise ValueError(f"moments must be (..., 2C, h, w); got shape {moments.shape}")
    mean, logvar = np.split(moments, 2, axis=-3)
    std = np.exp(np.float32(0.5) * np.clip(logvar, *LOGVAR_RANGE))
    return np.float32(scale) * (mean + std * rng.standard_normal(mean.shape, dtype=np.float32))


def noisy_and_target(
    cfg: StableDiffusionConfig, latents: np.ndarray, noise: np.ndarray, timesteps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The model input x_t and its v-prediction target, the numpy reference of every model.

    The two table entries are cast to ``latents.dtype`` before the products, as the models do
    with their float32 tables, so float32 inputs give the models' exact float32 arithmetic and
    float64 inputs the exact values.

    Args:
        cfg: the workload config.
        latents: clean latents x0, (B, ...) (e.g. (B, 4, h, w)).
        noise: epsilon, same shape as ``latents``.
        timesteps: (B,) integer timesteps in [0, num_timesteps).

    Returns:
        ``(x_t, v)`` with ``x_t = a latents + s noise`` and ``v = a noise - s latents``, where
        ``a = sqrt(alphas_cumprod[t])`` and ``s = sqrt(1 - alphas_cumprod[t])``.
    """
    latents, noise = np.asarray(latents), np.asarray(noise)
    if latents.shape != noise.shape:
        raise ValueError(f"latents {latents.shape} and noise {noise.shape} must have one shape")
    timesteps = np.asarray(timesteps)
    if timesteps.shape != latents.shape[:1]:
        raise ValueError(f"timesteps {timesteps.shape} must be (B,) = {latents.shape[:1]}")
    tables = schedule(cfg)
    per_sample = (-1,) + (1,) * (latents.ndim - 1)  # (B, 1, 1, 1): broadcast over the sample
    a = tables.sqrt_alphas_cumprod[timesteps].astype(latents.dtype).reshape(per_sample)
    s = tables.sqrt_one_minus_alphas_cumprod[timesteps].astype(latents.dtype).reshape(per_sample)
    return a * latents + s * noise, a * noise - s * latents


def ddim_timesteps(cfg: StableDiffusionConfig, steps: int) -> np.ndarray:
    """The timesteps DDIM visits, in visiting order (high to low).

    ``arange(steps) * (T // steps) + 1``: ldm's "uniform" discretisation shifted by one (its
    ``+ 1``; diffusers' ``steps_offset=1``), so 50 steps of T = 1000 visit 981, 961, ..., 1.

    Args:
        cfg: the workload config (``num_timesteps`` = T).
        steps: number of sampling steps, 1 <= steps <= T.

    Returns:
        int64 array of shape (steps,), descending.
    """
    if not 1 <= steps <= cfg.num_timesteps:
        raise ValueError(f"steps must be in [1, {cfg.num_timesteps}] (num_timesteps); got {steps}")
    stride = cfg.num_timesteps // steps
    return (np.arange(steps, dtype=np.int64) * stride + 1)[::-1].copy()


def guided(denoise: Denoiser, x: Any, t: int, guidance_scale: float) -> Any:
    """Classifier-free guidance: ``v_u + g (v_c - v_u)``; one conditional call when g is 1.

    Args:
        denoise: the UNet closure ``denoise(x, t, conditional) -> v``.
        x: the current latents (framework array).
        t: the integer timestep.
        guidance_scale: g; 1.0 is plain conditional sampling.

    Returns:
        The guided v estimate, same shape as ``x``.
    """
    if guidance_scale == 1.0:
        return denoise(x, t, True)
    v_uncond = denoise(x, t, False)
    v_cond = denoise(x, t, True)
    return v_uncond + (v_cond - v_uncond) * float(guidance_scale)


def ddim_sample(
    denoise: Denoiser,
    x: Any,
    cfg: StableDiffusionConfig,
    steps: int,
    guidance_scale: float = 1.0,
) -> Any:
    """Deterministic DDIM (eta 0) for a v-prediction model, from noise to clean latents.

    At each visited t, with ``a = alphas_cumprod[t]`` and ``a'`` the value at the next visited
    (lower) timestep (``alphas_cumprod[0]`` after the last step, as ldm and diffusers with
    ``set_alpha_to_one=False`` use):
    ``x0 = sqrt(a) x - sqrt(1-a) v``, ``eps = sqrt(1-a) x + sqrt(a) v``,
    ``x <- sqrt(a') x0 + sqrt(1-a') eps``.

    Args:
        denoise: ``denoise(x, t, conditional) -> v``, a framework closure around the UNet and the
            (conditional or empty-caption) context; called once per step when
            ``guidance_scale`` is 1.0, else twice (see :func:`guided`).
        x: the starting noise x_T, e.g. (B, 4, h, w), a torch tensor, JAX array or TF tensor;
            only ``*`` and ``+``/``-`` with python floats are applied to it.
        cfg: the workload config (its schedule).
        steps: number of DDIM steps (the MLPerf evaluation uses ``cfg.sampler_steps`` = 50).
        guidance_scale: classifier-free guidance scale (MLPerf: ``cfg.guidance_scale`` = 8).

    Returns:
        The sampled latents, same type and shape as ``x``.
    """
    alphas = schedule(cfg).alphas_cumprod
    visited = ddim_timesteps(cfg, steps)
    previous = [*visited[1:], None]  # None: past the last step, a' = alphas_cumprod[0]
    for t, t_prev in zip(visited, previous, strict=True):
        a = float(alphas[t])
        a_prev = float(alphas[0 if t_prev is None else t_prev])
        v = guided(denoise, x, int(t), guidance_scale)
        x0 = x * a**0.5 - v * (1.0 - a) ** 0.5
        eps = x * (1.0 - a) ** 0.5 + v * a**0.5
        x = x0 * a_prev**0.5 + eps * (1.0 - a_prev) ** 0.5
    return x

"""Stable Diffusion v2 UNet training (MLPerf Training ``stable_diffusion``) in three frameworks.

Forward (same in all three frameworks; B batch, C latent channels, h x w latent pixels, L text
tokens, D text width); batches and outputs are NCHW (PyTorch's layout), the JAX and TF models
compute in NHWC inside::

    latents x0, noise e (B, C, h, w), timesteps t (B,), context (B, L, D)
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e           a_t: cumulative product of 1 - beta
    v   = sqrt(a_t) e  - sqrt(1 - a_t) x0          the v-prediction target
    prediction = UNet(x_t, t, context)             (B, C, h, w)
    loss = mean((prediction - v) ** 2)

The text encoder and the VAE are frozen in MLPerf and run outside the UNet: ``context`` is the
text encoder's output and ``latents`` a sample of the VAE's moments, times 0.18215. The tiny
preset uses numpy stand-ins for both (:mod:`.standins`); :mod:`.data` reads the reference's
webdataset shards of VAE moments and captions.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mlperf_tutor.core.batch import BatchCheck, Ids
from mlperf_tutor.core.checkpoint import Tree
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec
from mlperf_tutor.workloads.base import Workload, endless_batches, epoch_rng, new_data_directory
from mlperf_tutor.workloads.recipe import Recipe, Target
from mlperf_tutor.workloads.stable_diffusion import hf
from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig
from mlperf_tutor.workloads.stable_diffusion.plan import unet_plan
from mlperf_tutor.workloads.stable_diffusion.shapes import canonical_shapes, init_canonical

# Seeds of the eval captions and of the sampler's starting noise: far from the training
# batches' seeds (seed + 1 + step).
EVAL_SEED = 2**31 - 7


def flops_per_image(cfg: StableDiffusionConfig) -> float:
    """Model FLOPs of one training image (forward + backward = 3x the forward's 2 x MACs).

    Counted layer by layer from the plan: convolutions ``2 k^2 C_in C_out h w``, linear layers
    ``2 in out`` per token, attention scores and mixing ``4 T S C`` per transformer; norms,
    activations and the timestep embedding's O(1) work left out.
    """
    plan, s, td = unet_plan(cfg), cfg.latent_size, cfg.time_dim
    macs = 9 * cfg.latent_channels * cfg.model_channels * s * s * 2  # conv_in and conv_out

    def resnet(n_in, n_out, hw):
        return 9 * n_in * n_out * hw + 9 * n_out * n_out * hw + (n_in != n_out) * n_in * n_out * hw

    def transformer(ch, hw):
        linear = 2 * ch * ch + cfg.transformer_depth * (
            4 * ch * ch
            + 2 * ch * ch
            + 2 * cfg.context_len * cfg.context_dim * ch / hw
            + 12 * ch * ch
        )  # proj_in/out; self-attn q,k,v,o; cross q,o; cross k,v (per context token); GEGLU
        attention = cfg.transformer_depth * 2 * ch * (hw + cfg.context_len)
        return hw * (linear + attention)

    hw = s * s
    for level in plan.down:
        for n_in, n_out in level.resnets:
            macs += resnet(n_in, n_out, hw) + (transformer(n_out, hw) if level.heads else 0)
        if level.resample:
            macs += 9 * n_out * n_out * hw / 4
            hw //= 4
    macs += 2 * resnet(plan.mid_width, plan.mid_width, hw) + transformer(plan.mid_width, hw)
    for level in plan.up:
        for n_in, n_out in level.resnets:
            macs += resnet(n_in, n_out, hw) + (transformer(n_out, hw) if level.heads else 0)
        if level.resample:
            hw *= 4
            macs += 9 * n_out * n_out * hw
    macs += td * cfg.model_channels + td * td  # the time embedding, once per image
    return 3 * 2 * macs


class StableDiffusionWorkload(Workload):
    name = "stable_diffusion"
    rounds = ("v4.0", "v5.0")  # the summaries' benchmark columns
    description = (
        "Stable Diffusion v2 UNet (866M), v-prediction on VAE latents with text cross-attention;"
        " MLPerf targets FID <= 90 and CLIP score >= 0.15"
    )
    config_class = StableDiffusionConfig
    package = "mlperf_tutor.workloads.stable_diffusion"
    hf = hf.INTEROP  # diffusers UNet2DConditionModel interop

    def flops_per_sample(self, cfg: StableDiffusionConfig) -> float:
        """:func:`flops_per_image`: the UNet's forward and backward on one latent."""
        return flops_per_image(cfg)

    def check_mesh(self, cfg: StableDiffusionConfig, mesh) -> None:
        """Data and fsdp only: the UNet has no tensor-parallel plan here."""
        if mesh.tensor > 1:
            raise ValueError(
                f"workload {self.name!r} has no tensor-parallel plan; use the data and fsdp "
                f"axes (mesh {mesh})"
            )

    def canonical_shapes(self, cfg: StableDiffusionConfig) -> dict[str, tuple[int, ...]]:
        """The UNet's weights (what diffusers' ``UNet2DConditionModel`` counts)."""
        return canonical_shapes(cfg)

    def init_canonical(self, cfg: StableDiffusionConfig, seed: int = 0) -> Tree:
        # Not per weight (init_weight): a bias's range comes from its weight's fan-in, and
        # parity_weights draws the same weights without the zero layers.
        return init_canonical(cfg, seed)

    def parity_weights(self, cfg: StableDiffusionConfig, seed: int = 0) -> Tree:
        """The init without its zero layers (drawn like the others): with them the prediction
        is zero whatever the frameworks compute, and every layer before one gets an exactly
        zero first gradient, whose round-off AdamW then amplifies (1.3e-4 measured)."""
        return init_canonical(cfg, seed, zero_init=False)

    def synthetic_batch(self, cfg: StableDiffusionConfig, batch_size: int = 2, seed: int = 0):
        """Captions of the stand-in world, encoded by the stand-in text encoder; latents
        sampled from the stand-in VAE's moments of their rendered images; noise and timesteps
        uniform (see :func:`.standins.synthetic_batch`)."""
        from mlperf_tutor.workloads.stable_diffusion.standins import synthetic_batch

        return synthetic_batch(cfg, batch_size, seed)

    def batch_check(self, cfg: StableDiffusionConfig) -> BatchCheck:
        """Timesteps below ``num_timesteps`` (they index the noise schedule)."""
        return BatchCheck(ids=(Ids("timesteps", cfg.num_timesteps, "cfg.num_timesteps"),))

    def write_sample_data(
        self,
        cfg: StableDiffusionConfig,
        directory: str | os.PathLike,
        *,
        samples: int = 64,
        seed: int = 0,
    ) -> Path:
        """Webdataset shards ``directory/00000.tar``, ``00001.tar`` of the synthetic world, as
        the reference's training shards: per sample the stand-in VAE's moments (``.npy``,
        float32) of the caption's picture and the caption (``.txt``); returns ``directory``."""
        from mlperf_tutor.workloads.stable_diffusion.data import write_sample_shards
        from mlperf_tutor.workloads.stable_diffusion.standins import synthetic_samples

        directory = new_data_directory(directory, samples)
        captions, moments = synthetic_samples(cfg, np.random.default_rng(seed), samples)
        return write_sample_shards(directory, moments, captions)

    def data_batches(
        self,
        cfg: StableDiffusionConfig,
        path: str | os.PathLike,
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of the uncompressed ``.tar`` shards at ``path`` (a shard, or a directory of
        them), through :class:`~.data.ShardIndex`: epoch ``e`` is a permutation of the samples
        seeded by ``(seed, e)``; batch ``j``'s latents, noise and timesteps are drawn from
        ``(seed, e, j)`` (see :func:`~.data.make_batch`) and its context is the stand-in text
        encoder's, as in :meth:`synthetic_batch`."""
        from mlperf_tutor.workloads.stable_diffusion.data import (
            ShardIndex,
            make_batch,
            shard_paths,
        )
        from mlperf_tutor.workloads.stable_diffusion.standins import StandInTextEncoder

        index = ShardIndex(shard_paths(path), cfg.latent_channels, cfg.latent_size)
        encoder = StandInTextEncoder(cfg.context_len, cfg.context_dim)

        def epoch(e: int, first: int) -> Iterator[dict[str, np.ndarray]]:
            order = epoch_rng(seed, e).permutation(len(index))
            for j in range(first, len(index) // batch_size):
                samples = index.read(order[j * batch_size : (j + 1) * batch_size])
                yield make_batch(cfg, encoder, samples, epoch_rng(seed, e, j))

        return endless_batches(path, len(index), batch_size, seed, start, epoch)

    def optimizer(self, cfg: StableDiffusionConfig) -> tuple[OptimizerSpec, ScheduleSpec]:
        spec = OptimizerSpec(
            "adamw", beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        schedule = ScheduleSpec(
            cfg.lr, warmup_steps=cfg.warmup_steps, warmup_init_factor=cfg.warmup_init_factor
        )
        return spec, schedule

    # --- MLPerf -------------------------------------------------------------------------
    def recipe(self, cfg: StableDiffusionConfig) -> Recipe:
        """MLPerf's ``stable_diffusion``: both bars, FID at most ``cfg.fid_target`` and CLIP
        score at least ``cfg.clip_target`` (the tiny preset's stand-in metrics have their own),
        evaluated every ``cfg.eval_every_samples``; the logged hyperparameters are the keys of
        mlperf_logging's ``training_4.0.0/closed_stable_diffusion.yaml``."""
        spec, schedule = self.optimizer(cfg)
        return Recipe(
            benchmark="stable_diffusion",
            targets=(
                Target("FID", cfg.fid_target, higher_is_better=False),
                Target("CLIP", cfg.clip_target),
            ),
            eval_every=cfg.eval_every_samples,
            hyperparameters={
                "opt_name": "adamw",
                "opt_adamw_beta_1": spec.beta1,
                "opt_adamw_beta_2": spec.beta2,
                "opt_adamw_epsilon": spec.eps,
                "opt_adamw_weight_decay": spec.weight_decay,
                "opt_base_learning_rate": schedule.lr,
                "opt_learning_rate_warmup_steps": schedule.warmup_steps,
            },
        )

    def eval_set(self, cfg: StableDiffusionConfig) -> dict:
        """Captions (their contexts), the sampler's starting noise and the reference images'
        stand-in features: the same for every run."""
        from mlperf_tutor.workloads.stable_diffusion import standins

        rng = np.random.default_rng(EVAL_SEED)
        captions = standins.random_captions(rng, cfg.eval_samples)
        encoder = standins.StandInTextEncoder(cfg.context_len, cfg.context_dim)
        shape = (cfg.eval_samples, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        return {
            "captions": np.array(captions),
            "context": encoder(captions),
            "noise": rng.standard_normal(shape).astype(np.float32),
            "features": standins.image_features(standins.render(captions, cfg)),
        }

    def sample(
        self,
        framework: str,
        model,
        noise: np.ndarray,
        context: np.ndarray,
        cfg: StableDiffusionConfig,
        steps: int | None = None,
        guidance_scale: float | None = None,
        uncond_context: np.ndarray | None = None,
    ) -> np.ndarray:
        """DDIM latents (B, C, h, w) from ``noise`` and ``context`` with the model of
        ``framework``; the loop runs on that framework's arrays (see
        :func:`.diffusion.ddim_sample`). Guidance needs ``uncond_context`` (the empty caption's
        context); steps and guidance default to the config's."""
        from mlperf_tutor.workloads.stable_diffusion.diffusion import ddim_sample

        steps = steps or cfg.sampler_steps
        guidance = cfg.guidance_scale if guidance_scale is None else guidance_scale
        if guidance != 1.0 and uncond_context is None:
            raise ValueError("classifier-free guidance needs uncond_context (the empty caption's)")
        adapter = self.adapter(framework)
        denoise = _compiled_denoise(framework)
        ctx = adapter.from_numpy(np.asarray(context, np.float32))
        unc = (
            None
            if uncond_context is None
            else adapter.from_numpy(np.asarray(uncond_context, np.float32))
        )
        batch = len(noise)

        def step(x, t: int, conditional: bool):
            ts = adapter.from_numpy(np.full(batch, t, np.int32))
            return denoise(model, x, ts, ctx if conditional else unc)

        x = adapter.from_numpy(np.asarray(noise, np.float32))
        return adapter.to_numpy(ddim_sample(step, x, cfg, steps, guidance))

    def evaluate(self, framework: str, model, eval_set: dict, batch_size: int) -> dict:
        """Stand-in FID and CLIP score of DDIM samples for the eval captions, with the model's
        own config (``model.cfg``); see :mod:`.metrics` (the real metrics need InceptionV3 and
        OpenCLIP ViT-H/14, which are not shipped)."""
        from mlperf_tutor.workloads.stable_diffusion import metrics, standins

        cfg = model.cfg
        vae = standins.StandInAutoencoder()
        encoder = standins.StandInTextEncoder(cfg.context_len, cfg.context_dim)
        uncond = encoder([""] * batch_size)
        images = []
        for start in range(0, len(eval_set["noise"]), batch_size):
            part = slice(start, start + batch_size)
            n = len(eval_set["noise"][part])
            latents = self.sample(
                framework,
                model,
                eval_set["noise"][part],
                eval_set["context"][part],
                cfg,
                uncond_context=uncond[:n],
            )
            images.append(vae.decode(latents / cfg.latent_scale))
        images = np.concatenate(images)
        captions = [str(c) for c in eval_set["captions"]]
        fid = metrics.frechet_distance(
            *metrics.gaussian_stats(standins.image_features(images)),
            *metrics.gaussian_stats(eval_set["features"]),
        )
        clip = metrics.clip_score(*standins.clip_embeddings(images, captions, cfg))
        return {"FID": float(fid), "CLIP": float(clip)}

    def info(self, cfg: StableDiffusionConfig) -> dict:
        n = self.param_count(cfg)
        return {
            "workload": self.name,
            "UNet parameters": n,
            "training FLOPs per image": flops_per_image(cfg),
            "fp32 weights + grads + AdamW moments (GB)": 16 * n / 1e9,
            "latent shape": (cfg.latent_channels, cfg.latent_size, cfg.latent_size),
            "global batch size": cfg.global_batch_size,
            "peak learning rate": cfg.lr,
        }


@functools.cache
def _compiled_denoise(framework: str):
    """``denoise(model, x, t, context)``, compiled where that pays off on a CPU: JAX under
    ``nnx.jit`` and TF as a ``tf.function`` per model (eager, both dispatch op by op: 5x and
    10x slower than torch's eager UNet on the tiny eval); torch eagerly."""
    if framework == "jax":
        from flax import nnx

        return nnx.jit(lambda model, x, t, c: model.denoise(x, t, c))
    if framework == "tf":
        import weakref

        import tensorflow as tf

        traced = weakref.WeakKeyDictionary()

        def denoise(model, x, t, c):
            if model not in traced:
                traced[model] = tf.function(model.denoise, reduce_retracing=True)
            return traced[model](x, t, c)

        return denoise
    return lambda model, x, t, c: model.denoise(x, t, c)


WORKLOAD = StableDiffusionWorkload()

__all__ = ["WORKLOAD", "StableDiffusionConfig", "flops_per_image"]

"""Frozen, deterministic numpy stand-ins for the networks that MLPerf's SD v2 benchmark keeps
frozen, and the small synthetic world the ``tiny`` preset trains on.

MLPerf trains only the UNet. Around it sit frozen networks that this package does not ship
(nothing is downloaded):

- the text encoder, OpenCLIP ViT-H/14 (laion2b_s32b_b79k), whose penultimate layer gives a
  (77, 1024) context per caption;
- the autoencoder, SD's ``AutoencoderKL``: 512x512 RGB images <-> 4x64x64 latents (factor 8);
  its encoder's moments are what the training shards store;
- for evaluation, InceptionV3 (FID features) and the same OpenCLIP model (CLIP score).

The :class:`TextEncoder` and :class:`Autoencoder` protocols are the interface: to use the real
networks, wrap ``open_clip`` and ``diffusers.AutoencoderKL`` in a class with these methods (the
real encoder's ``encode`` returns ``latent_dist.parameters``, its moments). The stand-ins here
are cheap pure functions of their inputs, so the tiny preset runs on a CPU in seconds, but their
FID and CLIP numbers are NOT comparable with the real ones: they only rank a tiny model's
samples against the synthetic world's own pictures.

The synthetic world: captions ``"a {fg} {shape} on a {bg} background"`` (6 colours, fg != bg,
3 shapes; 90 captions), each rendered as one centred shape about half the image wide.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig
from mlperf_tutor.workloads.stable_diffusion.diffusion import sample_latents

FACTOR = 8  # image pixels per latent pixel, per side (SD's AutoencoderKL)
COLORS = {  # well separated RGB in [0, 1]
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.7, 0.25),
    "blue": (0.15, 0.3, 0.85),
    "yellow": (0.9, 0.8, 0.15),
    "white": (0.92, 0.92, 0.92),
    "black": (0.08, 0.08, 0.08),
}
SHAPES = ("square", "circle", "cross")
WORDS = ("a", "on", "background", *COLORS, *SHAPES)  # the stand-in tokenizer's fixed vocabulary
HASH_BUCKETS = 256  # ids for any other word (zlib.crc32 of it)
BOS, EOS = 0, 1
LOGVAR = float(np.log(1e-4))  # the stand-in encoder's posterior log-variance: std 0.01
_CAPTION = re.compile(r"a (\w+) (\w+) on a (\w+) background")


@runtime_checkable
class TextEncoder(Protocol):
    """A frozen caption encoder: ``(B,)`` captions -> ``(B, context_len, context_dim)`` float32.

    The real one is OpenCLIP ViT-H/14's text tower, output of its penultimate layer after the
    final LayerNorm (77 x 1024).
    """

    context_len: int
    context_dim: int

    def __call__(self, captions: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class Autoencoder(Protocol):
    """A frozen image autoencoder with ``factor`` pixels per latent pixel (SD's AutoencoderKL: 8,
    4 latent channels).

    ``encode(images)``: (B, 3, H, W) in [0, 1] -> moments (B, 8, H/8, W/8), the posterior's mean
    and log-variance. ``decode(latents)``: (B, 4, h, w) UNscaled latents (divide the diffusion
    latents by 0.18215 first) -> (B, 3, 8h, 8w) images in [0, 1].
    """

    factor: int

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def decode(self, latents: np.ndarray) -> np.ndarray: ...


# --- the synthetic world -------------------------------------------------------------------------
def all_captions() -> list[str]:
    """The 90 captions of the synthetic world, in a fixed order."""
    return [
        f"a {fg} {shape} on a {bg} background"
        for fg in COLORS
        for shape in SHAPES
        for bg in COLORS
        if fg != bg
    ]


def random_captions(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` captions drawn uniformly (with replacement) from :func:`all_captions`."""
    captions = all_captions()
    return [captions[i] for i in rng.integers(0, len(captions), n)]


@functools.lru_cache(maxsize=8)
def _masks(size: int) -> dict[str, np.ndarray]:
    """(size, size) bool mask of each shape, centred; its extent is half the image."""
    c = (np.arange(size) + 0.5 - size / 2) / size  # pixel centres, in image widths from the middle
    dy, dx = np.abs(c)[:, None], np.abs(c)[None, :]
    masks = {
        "square": (dy < 0.25) & (dx < 0.25),
        "circle": dy**2 + dx**2 < 0.25**2,
        "cross": ((dy < 0.25) & (dx < 0.125)) | ((dy < 0.125) & (dx < 0.25)),
    }
    for mask in masks.values():
        mask.flags.writeable = False
    return masks


def _image_size(cfg_or_size: StableDiffusionConfig | int) -> int:
    if isinstance(cfg_or_size, StableDiffusionConfig):
        return cfg_or_size.latent_size * FACTOR
    return int(cfg_or_size)


def render(captions: Sequence[str], cfg_or_size: StableDiffusionConfig | int) -> np.ndarray:
    """Draw each caption's picture: its shape in the fg colour, centred on the bg colour.

    Args:
        captions: captions of the :func:`all_captions` grammar.
        cfg_or_size: the image side in pixels, or a config (``latent_size * 8`` pixels).

    Returns:
        (B, 3, S, S) float32 images in [0, 1].
    """
    size = _image_size(cfg_or_size)
    images = np.empty((len(captions), 3, size, size), np.float32)
    for i, caption in enumerate(captions):
        match = _CAPTION.fullmatch(caption)
        fg, shape, bg = match.groups() if match else (None, None, None)
        if fg not in COLORS or bg not in COLORS or shape not in SHAPES:
            raise ValueError(
                f"caption {caption!r} is not 'a <colour> <shape> on a <colour> background' with "
                f"colours {', '.join(COLORS)} and shapes {', '.join(SHAPES)}"
            )
        mask = _masks(size)[shape]
        images[i] = np.where(
            mask, np.array(COLORS[fg])[:, None, None], np.array(COLORS[bg])[:, None, None]
        )
    return images


# --- the stand-in text encoder -------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _text_tables(context_len: int, context_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((2 + len(WORDS) + HASH_BUCKETS, context_dim))  # (V, D)
    positions = rng.standard_normal((context_len, context_dim))  # (L, D)
    for table in (tokens, positions):
        table.flags.writeable = False
    return tokens, positions


class StandInTextEncoder:
    """A frozen bag of embeddings standing in for OpenCLIP ViT-H/14's text tower.

    Tokens: the lower-cased words of a caption; those of the synthetic world have fixed ids,
    any other word one of ``HASH_BUCKETS`` ids by ``zlib.crc32``. ``BOS`` comes first and
    ``EOS`` after the words, and ``EOS`` pads to ``context_len``; a longer caption is cut and
    its last token set to ``EOS`` (as OpenCLIP's tokenizer does). Each position's output is
    its token's row of a seeded normal table plus that position's row of a seeded positional
    table, standardized over the features like the LayerNorm that ends the real encoder (mean
    0, variance 1). A pure function of the captions: no state, no training.

    Args:
        context_len: L, tokens per caption (77 in SD v2).
        context_dim: D, the width (1024 in SD v2).
        seed: seeds the two tables.
    """

    def __init__(self, context_len: int, context_dim: int, seed: int = 0):
        if context_len < 2 or context_dim < 2:
            raise ValueError("context_len and context_dim must be at least 2")
        self.context_len, self.context_dim, self.seed = context_len, context_dim, seed
        self._ids = {word: 2 + i for i, word in enumerate(WORDS)}

    @property
    def vocab_size(self) -> int:
        return 2 + len(WORDS) + HASH_BUCKETS

    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        """(B, L) int32 token ids of ``captions``."""
        if isinstance(captions, str):
            raise TypeError("pass a sequence of captions, not one string")
        ids = np.full((len(captions), self.context_len), EOS, np.int32)
        extra = 2 + len(WORDS)
        for b, caption in enumerate(captions):
            words = re.findall(r"[a-z0-9]+", caption.lower())
            row = [BOS]
            row += [self._ids.get(w, extra + zlib.crc32(w.encode()) % HASH_BUCKETS) for w in words]
            row = row[: self.context_len - 1] + [EOS]
            ids[b, : len(row)] = row
        return ids

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        tokens, positions = _text_tables(self.context_len, self.context_dim, self.seed)
        x = tokens[self.tokenize(captions)] + positions  # (B, L, D)
        x = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
        return x.astype(np.float32)


# --- the stand-in autoencoder --------------------------------------------------------------------
def _encoder_matrix(latent_channels: int, seed: int) -> np.ndarray:
    """A (C, 3) matrix with singular values 18, 17 and 16: random orthonormal frames between."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((latent_channels, 3)))  # (C, 3) orthonormal columns
    v, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    return u @ np.diag([18.0, 17.0, 16.0]) @ v.T


class StandInAutoencoder:
    """A linear, patch-wise stand-in for SD's ``AutoencoderKL`` (factor 8).

    ``encode``: each 8x8 patch's mean RGB minus 0.5, times a fixed (C, 3) matrix ``M`` -> the
    latent mean; the log-variance channels are constant log(1e-4) (a sharp posterior, like
    the real encoder's). ``M``'s singular values (18, 17, 16) make ``0.18215 * z`` spread about
    as much as SD's scaled latents (std near 1 over the synthetic world's pictures, whose patch
    colours have a std near 0.35). ``decode``: ``pinv(M) z + 0.5`` per patch, repeated over its
    8x8 pixels and clipped to [0, 1]; it inverts ``encode`` exactly on patch-constant images.

    Args:
        latent_channels: C (at least 3, so ``M`` keeps all colour).
        seed: seeds ``M``.
        matrix: a (C, 3) matrix of rank 3 to use instead of the seeded one.
    """

    factor = FACTOR

    def __init__(self, latent_channels: int = 4, seed: int = 0, matrix: np.ndarray | None = None):
        if matrix is None:
            if latent_channels < 3:
                raise ValueError(f"latent_channels must be at least 3, got {latent_channels}")
            matrix = _encoder_matrix(latent_channels, seed)
        matrix = np.asarray(matrix, np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != 3 or np.linalg.matrix_rank(matrix) != 3:
            raise ValueError(f"matrix must be (C, 3) of rank 3; got shape {matrix.shape}")
        self.matrix, self.latent_channels = matrix, matrix.shape[0]
        self.inverse = np.linalg.pinv(matrix)  # (3, C)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) images in [0, 1] -> (B, 2C, H/8, W/8) float32 moments."""
        images = np.asarray(images, np.float64)
        b, c, height, width = images.shape if images.ndim == 4 else (0, 0, 1, 1)
        if images.ndim != 4 or c != 3 or height % FACTOR or width % FACTOR:
            raise ValueError(
                f"images must be (B, 3, H, W), H and W multiples of 8; got {images.shape}"
            )
        h, w = height // FACTOR, width // FACTOR
        patches = images.reshape(b, 3, h, FACTOR, w, FACTOR).mean(axis=(3, 5)) - 0.5
        mean = np.einsum("kc,bchw->bkhw", self.matrix, patches)  # (B, C, h, w)
        return np.concatenate([mean, np.full_like(mean, LOGVAR)], axis=1).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, C, h, w) unscaled latents -> (B, 3, 8h, 8w) float32 images in [0, 1]."""
        latents = np.asarray(latents, np.float64)
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, h, w); got {latents.shape}"
            )
        rgb = np.einsum("ck,bkhw->bchw", self.inverse, latents) + 0.5  # (B, 3, h, w)
        rgb = rgb.repeat(FACTOR, axis=2).repeat(FACTOR, axis=3)
        return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def synthetic_samples(
    cfg: StableDiffusionConfig, rng: np.random.Generator, n: int
) -> tuple[list[str], np.ndarray]:
    """``n`` samples of the synthetic world as the training shards hold them: captions drawn
    by :func:`random_captions` from ``rng``, and the (n, 2C, h, w) float32 moments of their
    pictures (rendered at ``latent_size * 8`` pixels) under :class:`StandInAutoencoder`."""
    captions = random_captions(rng, n)
    return captions, StandInAutoencoder(cfg.latent_channels).encode(render(captions, cfg))


def synthetic_batch(
    cfg: StableDiffusionConfig, batch_size: int, seed: int
) -> dict[str, np.ndarray]:
    """A training batch of the synthetic world, in the workload's batch format.

    Captions ``random_captions(np.random.default_rng(seed), batch_size)`` are rendered at
    ``latent_size * 8`` pixels, encoded by :class:`StandInAutoencoder` and a latent is sampled
    from the moments (scaled by ``cfg.latent_scale``); then noise N(0, 1) and timesteps uniform in
    [0, num_timesteps), all from the same generator; the context is
    :class:`StandInTextEncoder`'s. Deterministic per seed.

    Returns:
        ``latents``, ``noise`` (B, C, h, w) float32; ``timesteps`` (B,) int32; ``context``
        (B, L, D) float32.
    """
    rng = np.random.default_rng(seed)
    captions, moments = synthetic_samples(cfg, rng, batch_size)
    latents = sample_latents(moments, rng, cfg.latent_scale)
    noise = rng.standard_normal(latents.shape, dtype=np.float32)
    timesteps = rng.integers(0, cfg.num_timesteps, batch_size).astype(np.int32)
    context = StandInTextEncoder(cfg.context_len, cfg.context_dim)(captions)
    return {"latents": latents, "noise": noise, "timesteps": timesteps, "context": context}


# --- stand-in evaluation features ----------------------------------------------------------------
def image_features(images: np.ndarray) -> np.ndarray:
    """Stand-in FID features: each image average-pooled to 4x4 per colour channel (48 numbers).

    Why so few: the Frechet distance fits a covariance of F x F numbers, and the tiny preset
    scores 64 samples; 48 features keep the covariance estimable while still seeing the
    picture's layout (background around, shape in the middle) and its colours. Not
    InceptionV3's 2048 features: the distances are not comparable with real FIDs.

    Args:
        images: (B, 3, H, W) in [0, 1], H and W multiples of 4.

    Returns:
        (B, 48) float32.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % 4 or images.shape[3] % 4:
        raise ValueError(f"images must be (B, 3, H, W), H and W multiples of 4; got {images.shape}")
    b, _, height, width = images.shape
    pooled = images.reshape(b, 3, 4, height // 4, 4, width // 4).mean(axis=(3, 5))
    return pooled.reshape(b, 48)


def clip_embeddings(
    images: np.ndarray, captions: Sequence[str], cfg: StableDiffusionConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in CLIP embeddings: an image's is its pixels minus 0.5, flattened; a caption's is
    its rendered picture's (:func:`render` at the images' size), the same way.

    Their cosine (the CLIP score) is 1 for an image that is exactly what its caption describes,
    high for one that is close, and near 0 for noise. Not OpenCLIP's: the scores are not
    comparable with real CLIP scores.

    Args:
        images: (B, 3, S, S) in [0, 1].
        captions: B captions of the synthetic world.
        cfg: when given, the images must be ``cfg.latent_size * 8`` pixels wide.

    Returns:
        ``(image_emb, text_emb)``, each (B, 3 S^2) float32.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be (B, 3, S, S); got {images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if cfg is not None and images.shape[2] != _image_size(cfg):
        raise ValueError(
            f"images are {images.shape[2]} pixels wide; the config's {_image_size(cfg)}"
        )
    prototypes = render(captions, images.shape[2])
    return (images - 0.5).reshape(len(images), -1), (prototypes - 0.5).reshape(len(images), -1)

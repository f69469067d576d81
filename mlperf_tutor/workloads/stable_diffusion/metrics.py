"""The two MLPerf scores of SD v2 samples: FID and CLIP score, on features given as arrays.

- FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500): fit a Gaussian to the features of
  the generated images and one to those of the real images, and take their Frechet distance
  ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``. MLPerf v4.0: FID <= 90 on 30k COCO-2014
  validation captions, features from InceptionV3's 2048-d pool3 layer.
- CLIP score: the mean cosine similarity between the CLIP ViT-H/14 (OpenCLIP, laion2b_s32b_b79k)
  embedding of each generated image and that of its caption; raw cosine, no x100 and no clamping
  at 0 (unlike torchmetrics' CLIPScore). MLPerf v4.0: CLIP score >= 0.15.

Neither feature network ships with the package (nothing is downloaded): these functions take the
features as arrays. The ``tiny`` preset scores with small stand-in extractors (``standins.py``).
With the real networks (both PyTorch; install ``pytorch-fid`` and ``open_clip_torch``)::

    import numpy as np, open_clip, torch
    from pytorch_fid.inception import InceptionV3

    # FID features: images (N, 3, H, W) RGB float in [0, 1]; the module resizes to 299 itself.
    inception = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.no_grad():
        feats = inception(images)[0].squeeze(-1).squeeze(-1).numpy()  # (N, 2048)
    mu, sigma = gaussian_stats(feats)
    ref = np.load("val2014_30k_stats.npz")  # real-image statistics, pytorch-fid's .npz format
    fid = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])

    # CLIP score: PIL images and their captions, in the same order.
    clip, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-H-14", pretrained="laion2b_s32b_b79k")
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    with torch.no_grad():
        img = clip.encode_image(torch.stack([preprocess(p) for p in pil_images])).float()
        txt = clip.encode_text(tokenizer(captions)).float()
    score = clip_score(img.numpy(), txt.numpy())
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

# Added to both covariances' diagonals when sqrtm of their product fails (pytorch-fid's value).
SINGULAR_OFFSET = 1e-6
# Largest imaginary part tolerated on the diagonal of sqrtm(S1 S2): round-off makes a tiny one.
IMAG_TOLERANCE = 1e-3


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a set of feature vectors (rows are samples).

    Args:
        features: (N, D) features, N >= 2.

    Returns:
        ``(mu, sigma)``: float64 (D,) mean and (D, D) unbiased covariance (``rowvar=False``).
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2 samples; got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    # Quiet scipy's "singular matrix" warning: with fewer samples than dimensions the product is
    # singular, yet its square root (sqrt 0 = 0 on the null space) is still accurate.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(sigma1 @ sigma2)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2): the FID.

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))``, the matrix square
    root by ``scipy.linalg.sqrtm``. When it comes out non-finite, it is retried with
    ``SINGULAR_OFFSET`` added to both diagonals; its real part is used (a round-off imaginary
    part above ``IMAG_TOLERANCE`` on the diagonal is an error).

    Args:
        mu1: (D,) mean of the generated images' features.
        sigma1: (D, D) their covariance.
        mu2: (D,) mean of the reference images' features.
        sigma2: (D, D) their covariance.

    Returns:
        The distance, a python float (>= 0 up to round-off).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(mu, np.float64)) for mu in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"need mu (D,) and sigma (D, D) of one D; got mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
            f"mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    covmean = _sqrtm_product(sigma1, sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * SINGULAR_OFFSET
        covmean = _sqrtm_product(sigma1 + offset, sigma2 + offset)
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > IMAG_TOLERANCE:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary part of {imag:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """Mean cosine similarity of matching rows: the MLPerf CLIP score.

    Args:
        image_embeddings: (N, E) CLIP embeddings of the generated images.
        text_embeddings: (N, E) CLIP embeddings of their captions, row i captioning image i.

    Returns:
        ``mean_i cos(image_i, text_i)``, a python float in [-1, 1].
    """
    img = np.asarray(image_embeddings, dtype=np.float64)
    txt = np.asarray(text_embeddings, dtype=np.float64)
    if img.ndim != 2 or img.shape != txt.shape or img.shape[0] == 0:
        raise ValueError(
            f"need two (N, E) embedding arrays of one shape, N >= 1; got {img.shape} and "
            f"{txt.shape}"
        )
    norms = np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1)
    if not (norms > 0).all():
        raise ValueError("an embedding row is all zeros: its cosine similarity is undefined")
    return float(np.mean(np.sum(img * txt, axis=1) / norms))

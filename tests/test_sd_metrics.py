"""SD v2 evaluation scores on given features: the FID's Frechet distance (against an independent
computation through eigendecompositions) and the CLIP score (mean cosine similarity)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from mlperf_tutor.workloads.stable_diffusion import metrics


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features, as a network's are
    return rng.normal(size=(n, d)) @ mixing + shift


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, q = np.linalg.eigh(s)
    return (q * np.sqrt(np.clip(w, 0, None))) @ q.T


def _fid_by_eigh(mu1, s1, mu2, s2) -> float:
    """tr sqrt(S1 S2) = tr sqrt(R S2 R) with R = S1^(1/2): a symmetric PSD matrix, so its square
    root's trace is the sum of the square roots of its eigenvalues."""
    r = _psd_sqrt(s1)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def test_gaussian_stats():
    f = _features(50, 6, seed=0)
    mu, sigma = metrics.gaussian_stats(f)
    centred = f - f.mean(0)
    np.testing.assert_allclose(mu, f.sum(0) / 50, atol=1e-14)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, atol=1e-14)  # unbiased
    assert mu.dtype == sigma.dtype == np.float64
    for bad in (f[:1], f[0]):
        with pytest.raises(ValueError, match="N >= 2"):
            metrics.gaussian_stats(bad)


@pytest.mark.parametrize("n", [500, 12])  # 12 < 32 features: singular covariances, as with few
def test_frechet_distance_matches_eigendecomposition(n):  # samples of 2048-d Inception features
    s1 = metrics.gaussian_stats(_features(n, 32, seed=1))
    s2 = metrics.gaussian_stats(_features(n, 32, seed=2, shift=0.3))
    fid = metrics.frechet_distance(*s1, *s2)
    ref = _fid_by_eigh(*s1, *s2)
    assert isinstance(fid, float) and fid > 0
    # Singular: the square root magnifies round-off on the null space (sqrt(1e-16) = 1e-8 per
    # null direction, in either computation); measured 8e-9 relative at n = 12.
    assert fid == pytest.approx(ref, rel=1e-9 if n > 32 else 1e-7)


def test_frechet_distance_of_identical_sets_is_zero():
    mu, sigma = metrics.gaussian_stats(_features(300, 16, seed=3))
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_shifting_the_means_adds_the_squared_distance():
    mu, sigma = metrics.gaussian_stats(_features(300, 16, seed=4))
    d = np.random.default_rng(5).normal(size=16)
    assert metrics.frechet_distance(mu + d, sigma, mu, sigma) == pytest.approx(d @ d, rel=1e-9)
    # Shifting the features shifts only the mean: same covariance, same added |d|^2.
    f1, f2 = _features(300, 16, seed=6), _features(300, 16, seed=7)
    base = metrics.frechet_distance(*metrics.gaussian_stats(f1), *metrics.gaussian_stats(f2))
    mu1, s1 = metrics.gaussian_stats(f1 + d)
    mu2, s2 = metrics.gaussian_stats(f2)
    expected = base + d @ d + 2 * d @ (f1.mean(0) - f2.mean(0))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_known_gaussians():
    # 1-d: (m1 - m2)^2 + (sd1 - sd2)^2.
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # Commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    fid = metrics.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b))
    assert fid == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def test_frechet_distance_retries_with_an_offset_when_sqrtm_fails(monkeypatch):
    s1 = metrics.gaussian_stats(_features(200, 8, seed=8))
    s2 = metrics.gaussian_stats(_features(200, 8, seed=9))
    real_sqrtm, seen = scipy.linalg.sqrtm, []

    def flaky_sqrtm(a):  # non-finite the first time, as older scipy returned for singular input
        seen.append(a)
        return np.full_like(a, np.nan) if len(seen) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    fid = metrics.frechet_distance(*s1, *s2)
    eps = metrics.SINGULAR_OFFSET * np.eye(8)
    np.testing.assert_allclose(seen[1], (s1[1] + eps) @ (s2[1] + eps), rtol=1e-15)
    # The offset moves the result by O(eps) for well-conditioned covariances.
    assert fid == pytest.approx(_fid_by_eigh(*s1, *s2), abs=1e-4)


def test_frechet_distance_rejects_a_complex_root_and_bad_shapes(monkeypatch):
    mu, sigma = metrics.gaussian_stats(_features(50, 4, seed=10))
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: a + 0.1j * np.eye(len(a)))
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance(mu, sigma, mu, sigma)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: a + 1e-9j * np.eye(len(a)))
    assert np.isfinite(metrics.frechet_distance(mu, sigma, mu, sigma))  # round-off: dropped
    with pytest.raises(ValueError, match="one D"):
        metrics.frechet_distance(mu, sigma, mu[:3], sigma)


def test_clip_score_is_the_mean_cosine_of_row_pairs():
    rng = np.random.default_rng(11)
    img, txt = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))
    cos = [i @ t / np.linalg.norm(i) / np.linalg.norm(t) for i, t in zip(img, txt, strict=True)]
    score = metrics.clip_score(img, txt)
    assert isinstance(score, float)
    assert score == pytest.approx(np.mean(cos), rel=1e-12)
    # Invariant to each embedding's length (CLIP embeddings are compared normalised).
    scales = rng.uniform(0.1, 10, size=(20, 1))
    assert metrics.clip_score(img * scales, txt / scales) == pytest.approx(score, rel=1e-12)
    # Pairs, not all-against-all: shuffling the captions changes the score.
    assert metrics.clip_score(img, txt[::-1]) != pytest.approx(score)


def test_clip_score_extremes_and_errors():
    e = np.eye(3)
    assert metrics.clip_score(e, 2 * e) == pytest.approx(1.0)
    assert metrics.clip_score(e, -e) == pytest.approx(-1.0)  # raw cosine: no clamping at 0
    assert metrics.clip_score(e, np.roll(e, 1, axis=0)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="one shape"):
        metrics.clip_score(e, e[:2])
    with pytest.raises(ValueError, match="all zeros"):
        metrics.clip_score(e, np.zeros((3, 3)))

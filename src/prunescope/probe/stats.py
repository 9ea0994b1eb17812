"""Statistics of discrete distributions: entropy, divergences, tests, intervals, debiasing.

All functions are pure (numpy in, floats out). Logarithms are base 2 (bits).
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def normalise(p: np.ndarray) -> np.ndarray:
    """``p / p.sum()``; all-NaN when the sum is not positive."""
    p = np.asarray(p, dtype=float)
    s = p.sum()
    return p / s if s > 0 else np.full_like(p, np.nan)


def entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy of ``p`` in bits."""
    p = normalise(p)
    nz = p[p > 0]
    return float(-(nz * np.log2(nz)).sum())


def kl_bits(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in bits; ``inf`` when p puts mass where q has none."""
    p, q = normalise(p), normalise(q)
    mask = p > 0
    if np.any(q[mask] <= 0):
        return math.inf
    return float((p[mask] * np.log2(p[mask] / q[mask])).sum())


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (square root of the base-2 JS divergence), in [0, 1]."""
    p, q = normalise(p), normalise(q)
    m = (p + q) / 2
    return float(math.sqrt(max(0.0, (kl_bits(p, m) + kl_bits(q, m)) / 2)))


def js_noise(samples: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """How far the mean of (N, K) per-prefix distributions lies from the mean it estimates, by
    chance alone: the median Jensen-Shannon distance between the (normalised) mean of ``N`` rows
    drawn with replacement and the mean of all rows, over ``draws`` bootstrap draws. A field
    whose true marginal is exactly a target is measured at about this distance from it; when
    earlier sampled cells nearly decide the field (a name before a gender), it is large."""
    samples = np.asarray(samples, dtype=float)
    n = samples.shape[0]
    if n < 2:
        return float("nan")
    full = samples.mean(axis=0)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(draws, n))  # [draws, N]
    return float(np.median([js_distance(samples[idx].mean(axis=0), full) for idx in picks]))


def wilson(count: np.ndarray, n: int, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of ``count / n`` (elementwise); NaN for ``n == 0``."""
    count = np.asarray(count, dtype=float)
    if n <= 0:
        return np.full_like(count, np.nan), np.full_like(count, np.nan)
    phat = count / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def mean_band(samples: np.ndarray, z: float = Z95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over axis 0 of (N, K) per-prefix distributions with a normal ``z`` band (mean, low, high)."""
    samples = np.asarray(samples, dtype=float)
    n = samples.shape[0]
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full_like(mean, np.nan)
    return mean, np.clip(mean - z * se, 0, 1), np.clip(mean + z * se, 0, 1)


def chi_square(counts: np.ndarray, reference: np.ndarray) -> tuple[float | None, float | None]:
    """Pearson chi-square statistic and p-value of ``counts`` against ``reference`` probabilities.

    ``(None, None)`` when there are no counts or the reference gives zero to a category.
    """
    from scipy import stats

    counts = np.asarray(counts, dtype=float)
    ref = normalise(reference)
    n = counts.sum()
    if n <= 0 or np.any(ref <= 0) or len(counts) < 2:
        return None, None
    res = stats.chisquare(counts, f_exp=ref * n)
    return float(res.statistic), float(res.pvalue)


def calibrate(p: np.ndarray, content_free: np.ndarray) -> np.ndarray:
    """Contextual calibration (Zhao et al. 2021): ``p / p_cf`` renormalised (W = diag(p_cf)^-1, b = 0)."""
    cf = np.asarray(content_free, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(cf > 0, np.asarray(p, dtype=float) / cf, 0.0)
    return normalise(q)


def resample_to_target(
    values: list[int], model_p: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Sampling-importance-resampling of observed category indices towards ``target``.

    Each sampled value ``v`` gets weight ``target[v] / model_p[v]``; ``len(values)`` values are
    drawn with replacement by weight. Returns the resampled distribution and the acceptance rate
    rejection sampling would need (``1 / max weight``): the fraction of model samples kept.
    """
    model_p, target = normalise(model_p), normalise(target)
    k = len(target)
    if not values:
        return np.full(k, np.nan), math.nan
    with np.errstate(divide="ignore"):
        w_cat = np.where(model_p > 0, target / model_p, 0.0)
    w = w_cat[np.asarray(values)]
    if w.sum() <= 0:
        return np.full(k, np.nan), 0.0
    picks = rng.choice(len(values), size=len(values), replace=True, p=w / w.sum())
    out = np.bincount(np.asarray(values)[picks], minlength=k) / len(values)
    support = target > 0
    accept = float(1.0 / w_cat[support].max()) if np.all(model_p[support] > 0) else 0.0
    return out, accept

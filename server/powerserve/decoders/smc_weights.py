"""The weight maths of ``power_smc`` (Power-SMC), as small pure functions on log-weights [N]."""

from __future__ import annotations

import numpy as np


def ramp_alpha(t: int, alpha: float, ramp_tokens: int) -> float:
    """Exponent of the intermediate target after t tokens: 1 + (alpha - 1) * min(1, t / R)."""
    if ramp_tokens <= 0:
        return alpha
    return 1.0 + (alpha - 1.0) * min(1.0, t / ramp_tokens)


def effective_sample_size(logw: np.ndarray) -> float:
    """ESS = (sum w)^2 / sum w^2 of log-weights ``logw`` [N], between 1 and N."""
    w = np.exp(logw - logw.max())
    return float(w.sum() ** 2 / (w * w).sum())


def log_mean_exp(logw: np.ndarray) -> float:
    """log((1/N) sum exp(logw)): one factor of the SMC estimate of the normalising constant."""
    top = float(logw.max())
    return top + float(np.log(np.exp(logw - top).mean()))


def normalise(logw: np.ndarray) -> np.ndarray:
    """Probabilities proportional to exp(logw)."""
    w = np.exp(logw - logw.max())
    return np.asarray(w / w.sum())


def systematic_resample(probs: np.ndarray, u: float) -> np.ndarray:
    """Ancestor indices [N] (sorted) of systematic resampling with one uniform ``u`` in [0, 1).

    Particle k takes the ancestor whose cumulative-probability interval holds (k + u) / N, so
    ancestor i gets floor or ceil of N * probs[i] copies.
    """
    n = len(probs)
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0  # guard against rounding: every position must find an ancestor
    return np.searchsorted(cdf, (np.arange(n) + u) / n, side="right")

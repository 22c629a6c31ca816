"""Intervals shared by the analyses: every headline number is a mean over latents (or classes)
with a seeded 95% percentile-bootstrap interval, in one format: {value, low, high, n}."""

from __future__ import annotations

import numpy as np
from scipy import stats


def bootstrap_mean(values: np.ndarray, rng: np.random.Generator, n_boot: int) -> dict:
    """The mean with a 95% percentile-bootstrap interval (resampling the values); NaN when
    empty, and the value itself for a single one (every resample equals it)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        mean = float(values.mean()) if values.size else float("nan")
        return {"value": mean, "low": mean, "high": mean, "n": int(values.size)}
    batch = max(1, 4_000_000 // values.size)  # bounds the resample matrix at 4M values
    ci = stats.bootstrap((values,), np.mean, n_resamples=n_boot, batch=batch, method="percentile",
                         rng=rng).confidence_interval
    return {"value": float(values.mean()), "low": float(ci.low), "high": float(ci.high), "n": int(values.size)}

"""Intervals that say what is seed noise (no kedro): Student-t across seeds, Welch for a difference of two
variants, and the per-prompt paired bootstrap of a win rate within one seed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)


def mean_interval(values: Sequence[float | None], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval of the mean across seeds, ``(mean, low, high)``; missing values
    are left out, and the bounds are NaN with fewer than two values (one seed says nothing about noise)."""
    x = _finite(values)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def difference_interval(values: Sequence[float | None], reference: Sequence[float | None],
                        level: float = 0.95) -> tuple[float, float, float]:
    """Difference of means ``values − reference`` and its Welch interval (unequal variances, Welch–Satterthwaite
    degrees of freedom), ``(difference, low, high)``; NaN bounds with fewer than two values on either side."""
    a, b = _finite(values), _finite(reference)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan, math.nan
    difference = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return difference, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return difference, difference, difference
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + level / 2, dof) * math.sqrt(va + vb)
    return difference, difference - half, difference + half


def paired_bootstrap_win_rate(scores: Sequence[float], baseline: Sequence[float], resamples: int = 2000,
                              seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Win rate of ``scores`` over ``baseline`` on the same prompts (ties count one half, pairs with a missing
    score are left out) and its percentile interval from resampling the prompts with replacement,
    ``(win rate, low, high)``. The pairing keeps each prompt's difficulty out of the interval."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    outcome = np.where(a[keep] > b[keep], 1.0, np.where(a[keep] == b[keep], 0.5, 0.0))
    if len(outcome) == 0:
        return math.nan, math.nan, math.nan
    picks = np.random.default_rng(seed).integers(0, len(outcome), size=(resamples, len(outcome)))
    rates = outcome[picks].mean(axis=1)
    low, high = np.quantile(rates, [0.5 - level / 2, 0.5 + level / 2])
    return float(outcome.mean()), float(low), float(high)

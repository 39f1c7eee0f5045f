"""Intervals of the ablation study against hand-worked numbers and independent implementations."""

import math

import numpy as np
import pytest
from scipy import stats

from rlhf_pipeline.stats import difference_interval, mean_interval, paired_bootstrap_win_rate


def test_mean_interval_by_hand():
    # mean 2, sd 1, t(0.975, df=2) = 4.302653 (printed tables): half-width 4.302653 / sqrt(3)
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and (high - mean) == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)
    assert low == pytest.approx(2 * mean - high)


def test_mean_interval_leaves_out_missing_values_and_says_nothing_from_one_seed():
    assert mean_interval([1.0, None, 3.0, math.nan, 2.0]) == mean_interval([1.0, 2.0, 3.0])
    mean, low, high = mean_interval([0.7])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in mean_interval([None]))


def test_welch_difference_matches_scipys_t_test():
    a, b = [0.61, 0.55, 0.70, 0.66], [0.40, 0.52, 0.47]
    difference, low, high = difference_interval(a, b)
    reference = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert difference == pytest.approx(np.mean(a) - np.mean(b))
    assert (low, high) == pytest.approx((reference.low, reference.high))
    assert low > 0  # a clear difference: the interval excludes zero
    _, low, high = difference_interval([0.5, 0.6, 0.4], [0.45, 0.55, 0.65])
    assert low < 0 < high  # within seed noise


def test_paired_bootstrap_of_a_win_rate():
    # wins, losses and a tie; the pair with a missing score is left out: 1.5 / 3
    rate, low, high = paired_bootstrap_win_rate([1.0, 0.0, 2.0, 3.0], [0.0, 1.0, 2.0, math.nan])
    assert rate == 0.5 and 0.0 <= low <= rate <= high <= 1.0
    assert paired_bootstrap_win_rate([2.0] * 10, [1.0] * 10) == (1.0, 1.0, 1.0)
    # 400 prompts, half won: the interval is the normal one, ±1.96·sqrt(.25/400) = ±0.049
    outcome = [1.0, 0.0] * 200
    rate, low, high = paired_bootstrap_win_rate(outcome, [0.5] * 400, resamples=4000)
    assert rate == 0.5 and (high - low) == pytest.approx(2 * 1.96 * 0.025, abs=0.008)

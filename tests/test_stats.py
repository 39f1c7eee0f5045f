"""Intervals and stability measures of the studies against hand-worked numbers and independent implementations."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rlhf_pipeline.reporting import plot_frontier, stability_markdown, stability_table
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


def stability_curves() -> pd.DataFrame:
    steps = list(range(1, 11))
    gold = {0: [0, 0, 0, 0, 1, 1, 1, 1, 0, 0],  # rises, then falls back to where it began
            1: [0.25, 0.75] * 5}  # flat around 0.5 (binary fractions: every window mean is exactly 0.5)
    return pd.DataFrame([{"variant": "a", "seed": seed, "step": step, "gold_score": g, "kl/sequence": step / 10}
                         for seed, values in gold.items() for step, g in zip(steps, values, strict=True)])


def test_stability_finds_each_seeds_peak_window_and_whether_its_end_holds():
    table = stability_table(stability_curves(), window=0.2, level=0.95).set_index("variant")  # windows of 2
    row = table.loc["a"]
    # seed 0: the best window is steps 5-6 (mean 1, no spread), the last 0: drop 1, it collapses. seed 1: its first
    # window, steps 1-2, is as good as any (0.5; sd 0.3536 over 2: half-width t(0.975, 1) 12.706 x 0.25 = 3.18),
    # and its end is the same: it holds. Across seeds: 0.75 ± 12.706205 x 0.353553 / √2 = 0.75 ± 3.17655.
    assert (row["seeds"], row["seeds_holding"], row["peak_step"]) == (2, 1, (5.5 + 1.5) / 2)
    assert row["peak_gold"] == pytest.approx(0.75) and row["end_gold"] == pytest.approx(0.25)
    assert row["drop"] == pytest.approx(0.5) and row["end_kl"] == pytest.approx(0.95)
    assert row["peak_gold_high"] - row["peak_gold"] == pytest.approx(12.706205 * 0.353553 / math.sqrt(2), rel=1e-5)
    text = stability_markdown(table.reset_index(), 0.2, 0.95)
    assert "| a | 2 | 0.750 [-2.427, 3.927] | 4 | 0.250 [-2.927, 3.427] | 0.500 [-5.853, 6.853] | 0.950" in text
    assert "| 1/2 |" in text and "windows of 20% of the iterations" in text


def test_the_frontier_draws_mean_gold_against_root_kl_in_moving_windows():
    figure = plot_frontier(stability_curves(), window=0.2)
    line = figure.axes[0].lines[0]
    gold = pd.Series([0.125, 0.375, 0.125, 0.375, 0.625, 0.875, 0.625, 0.875, 0.125, 0.375])  # the seeds' mean
    kl = pd.Series([step / 10 for step in range(1, 11)])
    np.testing.assert_allclose(line.get_ydata(), gold.rolling(2).mean().dropna())
    np.testing.assert_allclose(line.get_xdata(), np.sqrt(kl.rolling(2).mean().dropna()))
    assert line.get_label() == "a"

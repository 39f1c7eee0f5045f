"""Tables, Markdown and figures of the results (no kedro): strict JSON, NaN-aware means, the evaluation's
comparison and the studies' summaries with intervals across seeds, stability and the frontier.

matplotlib and scipy are imported by the functions that draw or take intervals, so that the Kedro wiring, which
imports this module's JSON helpers, starts quickly."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

TRAINING_CURVES = {"reward/raw_score": "RM score", "gold_score": "gold score of the rollouts",
                   "judge_score": "judge score of the rollouts", "kl/sequence": "KL to SFT (nats per response)",
                   "response/perplexity": "perplexity", "response/length": "response length (tokens)"}
SUMMARY_METRICS = ("gold_score", "win_rate_vs_sft_gold", "win_rate_vs_sft_rm", "win_rate_vs_sft_judge", "rm_score",
                   "judge_score", "kl_to_sft", "perplexity", "response_length", "refusal_rate_harmful",
                   "refusal_rate_harmless")
RATES = {"win_rate_vs_sft_gold", "win_rate_vs_sft_rm", "win_rate_vs_sft_judge", "refusal_rate_harmful",
         "refusal_rate_harmless"}
COMPARED = ("gold_score", "rm_score", "judge_score", "kl_to_sft", "win_rate_vs_sft_gold", "win_rate_vs_sft_judge")


def is_number(value: Any) -> bool:
    """A finite int/float (not a bool, None or NaN): what a metric store can hold."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by ``None``, so that the JSON written is strict
    (``null``, never the bare ``NaN`` that jq, JavaScript and strict parsers reject)."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def nan_mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values that exist (not None or NaN); ``None`` when none does, e.g. gold scores on real data."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def markdown_table(table: pd.DataFrame) -> str:
    """``table`` as a Markdown table; floats to 3 decimals, a value that does not exist (None/NaN) reads ``n/a``."""
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (figures go to files and MLflow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def half_width(values: Iterable[float | None], level: float) -> float:
    """Half-width of the Student-t interval at ``level`` of the mean of ``values`` (``stats.mean_interval``); NaN
    with fewer than two values."""
    from rlhf_pipeline.stats import mean_interval

    mean, _, high = mean_interval(list(values), level)
    return high - mean


def colours(names: Iterable[str]) -> dict[str, tuple]:
    """One colour per name, in order, the same in every figure: tab20's strong ten first, then its light ten."""
    palette = pyplot().get_cmap("tab20").colors
    return dict(zip(names, (palette[0::2] + palette[1::2]) * 2, strict=False))


def window_width(steps: int, window: float) -> int:
    """Iterations in a moving window of ``window`` × ``steps`` (at least two)."""
    return max(2, round(window * steps))


def moving_average(curves: pd.DataFrame, window: float) -> pd.DataFrame:
    """``curves`` (``variant``, ``seed``, ``step`` and numeric metric columns) with every metric averaged, per
    (variant, seed), over trailing windows of ``window_width`` iterations; NaN until the first window fills."""
    def smooth(group: pd.DataFrame) -> pd.DataFrame:
        group = group.sort_values("step")
        metrics = group.drop(columns=["variant", "seed", "step"]).apply(pd.to_numeric, errors="coerce")
        return group[["variant", "seed", "step"]].join(metrics.rolling(window_width(len(group), window)).mean())

    return pd.concat([smooth(group) for _, group in curves.groupby(["variant", "seed"], sort=False)], ignore_index=True)


def plot_training_curves(curves: pd.DataFrame, level: float = 0.95, window: float | None = None) -> plt.Figure:
    """Training curves over PPO iterations, one line per ``variant``: the mean across its seeds (rows that share
    ``variant`` and ``step``) with a band of its Student-t interval at ``level`` (none for one seed), each seed's
    curve first averaged over moving windows of ``window`` × its iterations when given (``moving_average``).
    Columns: ``variant``, ``seed``, ``step`` and any of ``TRAINING_CURVES``; a curve with no value is left out."""
    charts = pyplot()
    if window:
        curves = moving_average(curves, window)
    metrics = [m for m in TRAINING_CURVES if m in curves and curves[m].notna().any()]
    names = list(dict.fromkeys(curves["variant"]))
    colour = colours(names)
    figure, axes = charts.subplots(1, len(metrics), figsize=(4 * len(metrics) + 2, 3.4), squeeze=False)
    for metric, axis in zip(metrics, axes[0], strict=True):
        for name, group in curves.groupby("variant", sort=False):
            by_step = group.groupby("step")[metric].agg(
                mean="mean", band=lambda seeds: half_width(seeds, level)).dropna(subset=["mean"])
            if by_step.empty:
                continue
            mean, band = by_step["mean"], by_step["band"].fillna(0.0)  # no band from one seed
            axis.plot(by_step.index, mean, label=name, color=colour[name], linewidth=2.2 if name == names[0] else 1.0,
                      marker="o" if len(by_step) == 1 else None)  # a line of one point draws nothing
            axis.fill_between(by_step.index, mean - band, mean + band, color=colour[name], alpha=0.12)
        axis.set_title(TRAINING_CURVES[metric])
        axis.set_xlabel("PPO iteration")
    handles, labels = axes[0][0].get_legend_handles_labels()  # the RM score exists for every row
    axes[0][-1].legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    return figure


def plot_comparison(table: pd.DataFrame) -> plt.Figure:
    """Bars of the evaluation per policy (``table``: one row per ``policy``): gold, RM and judge scores, KL to
    SFT, win rates by gold and by judge; a metric that does not exist is drawn empty and titled ``(n/a)``."""
    charts = pyplot()
    metrics = [m for m in COMPARED if m in table]
    figure, axes = charts.subplots(1, len(metrics), figsize=(3.5 * len(metrics), 3.2), squeeze=False)
    colours = charts.get_cmap("tab10").colors
    for metric, axis in zip(metrics, axes[0], strict=True):
        values = pd.to_numeric(table[metric], errors="coerce")
        axis.bar(table["policy"], values.fillna(0.0), color=colours[: len(table)])
        axis.set_title(metric if values.notna().any() else f"{metric} (n/a)")
    figure.tight_layout()
    return figure


def summary_table(runs: pd.DataFrame, reference: str, level: float) -> pd.DataFrame:
    """Per variant (``runs``: one row per variant and seed): mean and Student-t interval across seeds of each
    metric (clipped to [0, 1] for rates), and the difference from ``reference`` with its Welch interval;
    ``*_differs`` says whether that interval excludes zero (``stats``)."""
    from rlhf_pipeline.stats import difference_interval, mean_interval

    rows, reference_runs = [], runs[runs["variant"] == reference]
    for variant, group in runs.groupby("variant", sort=False):
        row = {"variant": variant, "seeds": len(group)}
        if "win_rate_vs_sft_gold_low" in group:  # seeds whose own paired-bootstrap interval lies above one half
            row["seeds_beating_sft_gold"] = int((group["win_rate_vs_sft_gold_low"] > 0.5).sum())
        for metric in SUMMARY_METRICS:
            if metric not in group or group[metric].isna().all():
                continue
            row[metric], low, high = mean_interval(group[metric].tolist(), level)
            if metric in RATES:  # a share cannot leave [0, 1], whatever three seeds' t-interval says
                low, high = max(low, 0.0), min(high, 1.0)
            row[f"{metric}_low"], row[f"{metric}_high"] = low, high
            diff, low, high = difference_interval(group[metric].tolist(), reference_runs[metric].tolist(), level)
            row[f"{metric}_vs_{reference}"] = diff
            row[f"{metric}_vs_{reference}_differs"] = bool(low > 0 or high < 0) if variant != reference else False
        rows.append(row)
    return pd.DataFrame(rows)


def interval_cell(row: pd.Series, metric: str) -> str:
    """``summary_table``'s ``metric`` of one row as ``mean [low, high]`` (3 decimals); the mean alone where the
    interval is not defined (one seed), ``n/a`` where the metric was not measured."""
    if pd.isna(row.get(metric)):
        return "n/a"
    low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    return f"{row[metric]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if pd.notna(low) and pd.notna(high) else "")


def summary_markdown(summary: pd.DataFrame, reference: str, level: float) -> str:
    """``summary_table``'s result as the docs show it: mean [interval] per metric; ``▲``/``▼`` where the
    difference from ``reference`` exceeds its interval."""
    def cell(row, metric: str) -> str:
        mark = ""
        if row.get(f"{metric}_vs_{reference}_differs"):
            mark = " ▲" if row[f"{metric}_vs_{reference}"] > 0 else " ▼"
        return interval_cell(row, metric) + mark

    shown = [m for m in ("gold_score", "win_rate_vs_sft_gold", "win_rate_vs_sft_rm", "win_rate_vs_sft_judge",
                         "kl_to_sft", "perplexity", "response_length", "refusal_rate_harmful", "refusal_rate_harmless")
             if m in summary]
    table = pd.DataFrame([{"variant": row["variant"], "seeds": row["seeds"], **{m: cell(row, m) for m in shown},
                           **({"seeds beating SFT": f"{row['seeds_beating_sft_gold']}/{row['seeds']}"}
                              if "seeds_beating_sft_gold" in row else {})}
                          for _, row in summary.iterrows()])
    note = (f"\nMean across seeds [{level:.0%} Student-t interval]; ▲/▼: the difference from {reference} exceeds its "
            f"{level:.0%} Welch interval. Seeds beating SFT: seeds whose gold win rate's {level:.0%} paired-bootstrap "
            "interval (over prompts) lies above 0.5.\n")
    return markdown_table(table) + note


def plot_gold(summary: pd.DataFrame, runs: pd.DataFrame, sft_gold: float | None) -> plt.Figure:
    """Final gold score per variant: bars of the mean with the interval across seeds, one dot per seed, and
    SFT's as a dashed line (none without a gold reward)."""
    figure, axis = pyplot().subplots(figsize=(max(6.0, 0.8 * len(summary)), 3.6))
    positions = range(len(summary))
    means = summary["gold_score"].astype(float) if "gold_score" in summary else pd.Series([math.nan] * len(summary))
    if "gold_score_low" in summary:
        errors = [(means - summary["gold_score_low"]).fillna(0).clip(lower=0),
                  (summary["gold_score_high"] - means).fillna(0).clip(lower=0)]
        axis.bar(positions, means.fillna(0.0), yerr=errors, capsize=3, color="tab:blue", alpha=0.7)
    for position, variant in zip(positions, summary["variant"], strict=True):
        seeds = runs.loc[runs["variant"] == variant, "gold_score"].astype(float)
        axis.scatter([position] * len(seeds), seeds, color="black", s=8, zorder=3)
    if sft_gold is not None:
        axis.axhline(sft_gold, color="grey", linestyle="--", label="SFT")
        axis.legend()
    axis.set_xticks(list(positions), summary["variant"], rotation=30, ha="right")
    axis.set_ylabel("gold score (held-out prompts)")
    figure.tight_layout()
    return figure


def findings_markdown(summary: pd.DataFrame, stability: pd.DataFrame, reference: str, level: float) -> str:
    """Which rows win, in words, from ``summary_table``'s and ``stability_table``'s results: the row with the
    highest mean gold score; the rows whose gold score differs from ``reference``'s beyond the Welch interval
    at ``level`` (``*_differs``); the rows that hold their peak gold to the end in every seed, and those that
    collapse in every seed. A Markdown list, empty without a gold score; rows with one seed have no interval, so
    they are named in neither direction."""
    def names(variants: Iterable[str]) -> str:
        return ", ".join(f"`{v}`" for v in variants) or "none"

    lines = []
    if "gold_score" in summary and summary["gold_score"].notna().any():
        best = summary.loc[summary["gold_score"].idxmax()]
        lines.append(f"Highest mean gold score: `{best['variant']}` ({best['seeds']} seed"
                     f"{'s' if best['seeds'] > 1 else ''}), {interval_cell(best, 'gold_score')}.")
        diff, differs = f"gold_score_vs_{reference}", f"gold_score_vs_{reference}_differs"
        if differs in summary:
            beyond = summary[summary[differs].fillna(False).astype(bool)]
            lines.append(f"Gold score above `{reference}`'s beyond the {level:.0%} Welch interval of the difference: "
                         f"{names(beyond.loc[beyond[diff] > 0, 'variant'])}; below it: "
                         f"{names(beyond.loc[beyond[diff] < 0, 'variant'])}; every other row is within the interval "
                         "or has one seed.")
    if not stability.empty:
        lines.append("Holding the peak gold to the end in every seed: "
                     f"{names(stability.loc[stability['seeds_holding'] == stability['seeds'], 'variant'])}; "
                     f"collapsing in every seed: {names(stability.loc[stability['seeds_holding'] == 0, 'variant'])}.")
    return "".join(f"- {line}\n" for line in lines)


def stability_table(curves: pd.DataFrame, window: float, level: float) -> pd.DataFrame:
    """Whether each variant holds its best gold score to the end of training (the paper's §5 claim for PPO-max).

    Per (variant, seed): the per-iteration gold score of the rollouts (``curves``: ``variant``, ``seed``, ``step``,
    ``gold_score``, ``kl/sequence``) averaged over moving windows of ``window`` × the run's iterations (at least
    two); the peak is the best window, with the Student-t interval at ``level`` of its iterations' means; the end
    is the last window. A seed *holds* when its end lies at or above the low end of its peak's interval, else it
    *collapses*.

    Returns:
        Per variant: ``seeds``, the mean and interval across seeds (``_low``/``_high``) of ``peak_gold``,
            ``end_gold``, ``drop`` (peak − end) and ``end_kl`` (the last window's KL to SFT, nats per response),
            ``peak_step`` (the peak window's middle iteration, averaged over seeds) and ``seeds_holding``; empty
            without a gold score.
    """
    from rlhf_pipeline.stats import mean_interval

    per_seed = []
    for (variant, seed), group in curves.groupby(["variant", "seed"], sort=False):
        group = group.sort_values("step")
        gold = pd.to_numeric(group["gold_score"], errors="coerce").reset_index(drop=True)
        width = window_width(len(group), window)
        means = gold.rolling(width).mean()  # each window ends at its index
        if means.notna().sum() == 0:
            continue
        peak = means.idxmax()
        half = half_width(gold.iloc[peak + 1 - width: peak + 1], level)
        kl = pd.to_numeric(group["kl/sequence"], errors="coerce").reset_index(drop=True).rolling(width).mean()
        per_seed.append({"variant": variant, "seed": seed, "peak_gold": means[peak],
                         "peak_step": group["step"].iloc[peak + 1 - width: peak + 1].mean(),
                         "end_gold": means.iloc[-1], "drop": means[peak] - means.iloc[-1], "end_kl": kl.iloc[-1],
                         "holds": bool(means.iloc[-1] >= means[peak] - half)})
    rows = []
    for variant, group in pd.DataFrame(per_seed).groupby("variant", sort=False) if per_seed else []:
        row = {"variant": variant, "seeds": len(group), "peak_step": float(group["peak_step"].mean()),
               "seeds_holding": int(group["holds"].sum())}
        for metric in ("peak_gold", "end_gold", "drop", "end_kl"):
            row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = mean_interval(group[metric].tolist(), level)
        rows.append(row)
    return pd.DataFrame(rows)


def stability_markdown(stability: pd.DataFrame, window: float, level: float) -> str:
    """``stability_table``'s result as the docs show it: mean [interval] across seeds per measure."""
    if stability.empty:
        return "No gold score along training: no stability measures.\n"

    table = pd.DataFrame([{"variant": row["variant"], "seeds": row["seeds"], "peak gold": interval_cell(row, "peak_gold"),
                           "peak at iteration": f"{row['peak_step']:.0f}", "end gold": interval_cell(row, "end_gold"),
                           "drop": interval_cell(row, "drop"), "KL to SFT at end": interval_cell(row, "end_kl"),
                           "seeds holding": f"{row['seeds_holding']}/{row['seeds']}"} for _, row in stability.iterrows()])
    note = (f"\nGold score of the rollouts along training, averaged over moving windows of {window:.0%} of the "
            f"iterations; peak: the best window, end: the last; mean across seeds [{level:.0%} Student-t interval]. A "
            f"seed holds when its end lies within or above its peak's {level:.0%} interval (over the window's "
            "iterations).\n")
    return markdown_table(table) + note


def plot_frontier(curves: pd.DataFrame, window: float) -> plt.Figure:
    """The over-optimisation frontier (Gao et al. 2022): gold score of the rollouts against √KL to SFT along
    training, one line per ``variant`` (the mean across seeds per iteration, averaged over moving windows of
    ``window`` × its iterations), from its first window (dot) to its last (square)."""
    figure, axis = pyplot().subplots(figsize=(6.4, 4.4))
    colour = colours(dict.fromkeys(curves["variant"]))
    smoothed = moving_average(curves[["variant", "seed", "step", "gold_score", "kl/sequence"]], window)
    for index, (variant, group) in enumerate(smoothed.groupby("variant", sort=False)):
        smooth = group.groupby("step")[["gold_score", "kl/sequence"]].mean().dropna()
        if smooth.empty:
            continue
        # the k1 estimate of the KL can dip below 0 near SFT (a sample mean of log-ratios); its root is taken at 0
        x, y = smooth["kl/sequence"].clip(lower=0.0) ** 0.5, smooth["gold_score"]
        axis.plot(x, y, color=colour[variant], label=variant, linewidth=2.2 if index == 0 else 1.2)
        axis.scatter([x.iloc[0]], [y.iloc[0]], color=colour[variant], marker="o", s=14)
        axis.scatter([x.iloc[-1]], [y.iloc[-1]], color=colour[variant], marker="s", s=18)
    axis.set_xlabel("√KL to SFT (√nats per response)")
    axis.set_ylabel("gold score of the rollouts")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure

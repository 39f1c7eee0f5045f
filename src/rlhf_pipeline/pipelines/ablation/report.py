"""The ablation study's report: the summary table with intervals and differences, its Markdown, and the figures."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from rlhf_pipeline.pipelines.evaluation.nodes import summary_markdown
from rlhf_pipeline.stats import difference_interval, mean_interval

CURVES = {"reward/raw_score": "RM score", "gold_score": "gold score of the rollouts", "kl/sequence": "KL to SFT",
          "response/perplexity": "perplexity", "response/length": "response length (tokens)"}
SUMMARY_METRICS = ("gold_score", "win_rate_vs_sft_gold", "win_rate_vs_sft_rm", "rm_score", "kl_to_sft", "perplexity",
                   "response_length", "refusal_rate_harmful", "refusal_rate_harmless")
RATES = {"win_rate_vs_sft_gold", "win_rate_vs_sft_rm", "refusal_rate_harmful", "refusal_rate_harmless"}


def summary_table(runs: pd.DataFrame, reference: str, level: float) -> pd.DataFrame:
    """Per variant: mean and interval across seeds of each metric (clipped to [0, 1] for rates), and the
    difference from ``reference`` (PPO-max) with its Welch interval; ``*_differs`` says whether that interval
    excludes zero."""
    rows, reference_runs = [], runs[runs["variant"] == reference]
    for variant, group in runs.groupby("variant", sort=False):
        row = {"variant": variant, "seeds": len(group)}
        if "win_rate_vs_sft_gold_low" in group:  # seeds whose own paired-bootstrap interval lies above one half
            row["seeds_beating_sft_gold"] = int((group["win_rate_vs_sft_gold_low"] > 0.5).sum())
        for metric in SUMMARY_METRICS:
            if metric not in group:
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


def markdown(summary: pd.DataFrame, reference: str, level: float) -> str:
    """The table the README shows: mean [interval] per metric; ``▲``/``▼`` where the difference from the reference
    exceeds its interval."""
    def cell(row, metric: str) -> str:
        if metric not in row or pd.isna(row[metric]):
            return "n/a"
        mark = ""
        if row.get(f"{metric}_vs_{reference}_differs"):
            mark = " ▲" if row[f"{metric}_vs_{reference}"] > 0 else " ▼"
        if pd.isna(row[f"{metric}_low"]):
            return f"{row[metric]:.3f}{mark}"
        return f"{row[metric]:.3f} [{row[f'{metric}_low']:.3f}, {row[f'{metric}_high']:.3f}]{mark}"

    shown = ("gold_score", "win_rate_vs_sft_gold", "win_rate_vs_sft_rm", "kl_to_sft", "perplexity", "response_length",
             "refusal_rate_harmful", "refusal_rate_harmless")
    table = pd.DataFrame([{"variant": row["variant"], "seeds": row["seeds"], **{m: cell(row, m) for m in shown},
                           **({"seeds beating SFT": f"{row['seeds_beating_sft_gold']}/{row['seeds']}"}
                              if "seeds_beating_sft_gold" in row else {})}
                          for _, row in summary.iterrows()])
    note = (f"\nMean across seeds [{level:.0%} Student-t interval]; ▲/▼: the difference from {reference} exceeds its "
            f"{level:.0%} Welch interval. Seeds beating SFT: seeds whose gold win rate's {level:.0%} paired-bootstrap "
            "interval (over prompts) lies above 0.5.\n")
    return summary_markdown(table) + note


def plot_curves(curves: pd.DataFrame) -> plt.Figure:
    """Training curves per variant over iterations: the mean across seeds and a band of ± one standard deviation."""
    metrics = [m for m in CURVES if m in curves and curves[m].notna().any()]
    variants = list(dict.fromkeys(curves["variant"]))
    palette = plt.get_cmap("tab20").colors
    colours = dict(zip(variants, palette[0::2] + palette[1::2], strict=False))  # 20 colours, the strong ten first
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics) + 2, 3.4))
    for metric, axis in zip(metrics, axes, strict=True):
        for variant, group in curves.groupby("variant", sort=False):
            by_step = group.groupby("step")[metric].agg(["mean", "std"]).dropna(subset=["mean"])
            if by_step.empty:
                continue
            axis.plot(by_step.index, by_step["mean"], label=variant, color=colours.get(variant),
                      linewidth=2.2 if variant == variants[0] else 1.0)
            axis.fill_between(by_step.index, by_step["mean"] - by_step["std"].fillna(0),
                              by_step["mean"] + by_step["std"].fillna(0), color=colours.get(variant), alpha=0.12)
        axis.set_title(CURVES[metric])
        axis.set_xlabel("PPO iteration")
    handles, labels = axes[0].get_legend_handles_labels()  # the RM score exists for every row
    axes[-1].legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    return figure


def plot_gold(summary: pd.DataFrame, runs: pd.DataFrame, sft_gold: float | None) -> plt.Figure:
    """Final gold score per variant: bars of the mean with the interval across seeds, one dot per seed, and SFT's."""
    figure, axis = plt.subplots(figsize=(max(6.0, 0.8 * len(summary)), 3.6))
    positions = range(len(summary))
    means = summary["gold_score"].astype(float)
    errors = [(means - summary["gold_score_low"]).fillna(0).clip(lower=0),
              (summary["gold_score_high"] - means).fillna(0).clip(lower=0)]
    axis.bar(positions, means, yerr=errors, capsize=3, color="tab:blue", alpha=0.7)
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

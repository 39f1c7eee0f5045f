"""A policy's evaluation on held-out prompts (no kedro): sampling with fixed settings, gold, RM and judge scores,
and its metrics against SFT's on the same prompts (win rates, KL, perplexity, diversity, refusals)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import SamplingConfig, fit_prompts, generate_texts
from rlhf_pipeline.modeling import ModelBundle
from rlhf_pipeline.reporting import TRAINING_CURVES, nan_mean, strict_json
from rlhf_pipeline.task import gold_score
from rlhf_pipeline.task.gold import REFUSAL
from rlhf_pipeline.training.devices import to_rank_device
from rlhf_pipeline.training.forward import encoded_logprob_sums
from rlhf_pipeline.training.reward import score_responses

SCORERS = ("gold", "rm", "judge")


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float]) -> float:
    """Share of pairs where ``scores`` beats ``baseline_scores``, ties counting one half; nan pairs are skipped."""
    pairs = [(a, b) for a, b in zip(scores, baseline_scores, strict=True) if not (math.isnan(a) or math.isnan(b))]
    if not pairs:
        return math.nan
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique word n-grams over all word n-grams of ``texts`` (1 = no repetition)."""
    ngrams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def kl_and_perplexity(policy, reference, encoder: DialogueEncoder, prompts: list[str], responses: list[str],
                      max_length: int, temperature: float = 1.0) -> dict[str, float]:
    """KL(π‖π_ref) per sequence, estimated (k1) on the policy's own samples, and the policy's perplexity of them;
    both read the distributions at the sampling ``temperature`` the responses were drawn with, as PPO does."""
    rows, pad = encoder.encode_many(prompts, [[r] for r in responses], max_length), encoder.tokenizer.pad_token_id
    policy_logp, counts = encoded_logprob_sums(policy, rows, pad, 16, temperature)
    reference_logp = policy_logp if policy is reference else encoded_logprob_sums(reference, rows, pad, 16, temperature)[0]
    fits = ~policy_logp.isnan()
    policy_logp, counts, reference_logp = policy_logp[fits], counts[fits], reference_logp[fits]
    return {"kl_to_sft": (policy_logp - reference_logp).mean().item(),
            "perplexity": math.exp(min(-policy_logp.sum().item() / max(counts.sum().item(), 1.0), 50.0))}


def correlation(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Pearson correlation over the pairs where both exist; ``None`` with fewer than 3 pairs or no spread."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 3:
        return None
    x, y = torch.tensor(pairs, dtype=torch.float64).T
    if x.std() == 0 or y.std() == 0:
        return None
    return torch.corrcoef(torch.stack([x, y]))[0, 1].item()


@dataclass
class EvalSet:
    """The held-out prompts that fit the context, tokenized once, with the sampling settings every policy shares."""

    prompts: list[str]
    categories: list[str]
    """The embedded task's request category per prompt (``unknown`` for other data)."""
    prompt_ids: list[list[int]]
    sampling: SamplingConfig
    seed: int
    """Sampling seed, the same for every policy."""
    max_length: int
    """Prompt + response tokens when scoring."""
    dropped: int
    """Prompts left out because they cannot fit ``max_length - sampling.max_new_tokens``."""

    @classmethod
    def of(cls, eval_prompts: pd.DataFrame, sft_model: ModelBundle, evaluation: dict[str, Any]) -> EvalSet:
        """The first ``evaluation["max_prompts"]`` rows of ``eval_prompts`` (``prompt``, ``category``) in the SFT
        model's prompt format; ``evaluation`` also gives ``sampling`` (``SamplingConfig`` fields), ``seed`` and
        ``max_length``. Raises ``KeyError`` for a missing key, ``TypeError`` for an unknown sampling field."""
        head = eval_prompts.head(evaluation["max_prompts"])
        encoder = sft_model.encoder()
        sampling, max_length = encoder.sampling(SamplingConfig(**evaluation["sampling"])), evaluation["max_length"]
        kept, prompt_ids = fit_prompts(encoder, head["prompt"].tolist(),
                                       max(max_length - sampling.max_new_tokens, 1), sampling.max_new_tokens)
        frame = head.iloc[kept]
        return cls(frame["prompt"].tolist(), frame["category"].tolist(), prompt_ids, sampling, evaluation["seed"],
                   max_length, len(head) - len(kept))


def sample_and_score(policy: ModelBundle, eval_set: EvalSet, reward_model: ModelBundle,
                     judge_model: ModelBundle | None = None) -> dict[str, list]:
    """One policy's responses to the evaluation prompts and, per prompt, their ``gold`` (NaN where the task has
    no gold reward), ``rm`` and (with a judge) ``judge`` scores, under keys ``prompts``, ``responses`` and the
    scorer names."""
    for model in (policy.model, reward_model.model, *([judge_model.model] if judge_model else [])):
        to_rank_device(model)  # an 8B model must not sample or score on the CPU for hours
    responses = generate_texts(policy.model, policy.tokenizer, eval_set.prompt_ids, eval_set.sampling,
                               seed=eval_set.seed)
    prompts = eval_set.prompts
    scores = {"prompts": list(prompts), "responses": responses,
              "gold": [gold_score(p, r) for p, r in zip(prompts, responses, strict=True)],
              "rm": score_responses(reward_model.model, reward_model.encoder(), prompts, responses,
                                    eval_set.max_length).tolist()}
    if judge_model is not None:
        scores["judge"] = score_responses(judge_model.model, judge_model.encoder(), prompts, responses,
                                          eval_set.max_length).tolist()
    return scores


def compare_with_sft(policy: ModelBundle, scores: dict[str, list], sft_scores: dict[str, list], sft_model: ModelBundle,
                     eval_set: EvalSet) -> dict[str, float | None]:
    """A policy's metrics against SFT's on the same prompts: mean scores and win rates per scorer (ties count
    one half), k1 KL to SFT per sequence (nats) and perplexity at the sampling temperature, mean length in words,
    distinct-1/2 and refusal rates on the task's harmful and harmless requests; ``None`` where a value does not
    exist (gold scores on real data). ``scores``/``sft_scores``: ``sample_and_score``'s, or the same with NaN
    read back as ``None`` from JSON. Raises ``ValueError`` when either answers other prompts than ``eval_set``
    (SFT's samples stored from another prompt set)."""
    for name, given in (("the policy's", scores), ("SFT's", sft_scores)):
        if given.get("prompts") != list(eval_set.prompts):  # none: stored before samples named their prompts
            raise ValueError(f"{name} samples answer other prompts than the evaluation set ({len(given.get('prompts') or [])} "
                             f"named, against {len(eval_set.prompts)}): samples stored from another prompt set; delete "
                             "them and run again")
    to_rank_device(sft_model.model)  # the KL reference
    scores, sft_scores = ({k: [math.nan if x is None else x for x in v] for k, v in s.items()}
                          for s in (scores, sft_scores))
    categories = eval_set.categories
    refused = [float(bool(REFUSAL.search(r))) for r in scores["responses"]]
    harmful = [c == "harmful" for c in categories]
    harmless = [c not in ("harmful", "unknown") for c in categories]  # requests the task knows to be harmless
    scorers = [s for s in SCORERS if s in scores]
    metrics = {
        **{f"{s}_score": nan_mean(scores[s]) for s in scorers},
        **{f"win_rate_vs_sft_{s}": win_rate(scores[s], sft_scores[s]) for s in scorers},
        **({"judge_gold_correlation": correlation(scores["judge"], scores["gold"])} if "judge" in scores else {}),
        **kl_and_perplexity(policy.model, sft_model.model, sft_model.encoder(), eval_set.prompts, scores["responses"],
                            eval_set.max_length, temperature=eval_set.sampling.temperature),
        "response_length": sum(len(r.split()) for r in scores["responses"]) / max(len(eval_set.prompts), 1),
        "distinct_1": distinct_n(scores["responses"], 1),
        "distinct_2": distinct_n(scores["responses"], 2),
        "refusal_rate_harmful": nan_mean([r for r, h in zip(refused, harmful, strict=True) if h]),
        "refusal_rate_harmless": nan_mean([r for r, h in zip(refused, harmless, strict=True) if h]),
        "prompts": len(eval_set.prompts),
        "prompts_dropped": eval_set.dropped,
    }
    return strict_json(metrics)


def samples_table(eval_set: EvalSet, **scores: dict[str, list]) -> pd.DataFrame:
    """Every sampled response with its prompt, category and scores, one row per (policy, prompt); ``scores``:
    policy name -> ``sample_and_score``'s result."""
    rows = []
    for policy, by_scorer in scores.items():
        for i, (prompt, category) in enumerate(zip(eval_set.prompts, eval_set.categories, strict=True)):
            rows.append({"policy": policy, "prompt": prompt, "category": category,
                         "response": by_scorer["responses"][i],
                         **{f"{s}_score": by_scorer[s][i] for s in SCORERS if s in by_scorer}})
    return pd.DataFrame(rows)


def rollout_curves(samples: list[dict], judge_model: ModelBundle | None, max_length: int) -> dict[int, dict[str, float]]:
    """Per PPO iteration, the mean ``gold_score`` and (with a judge, each pair cut to ``max_length`` tokens, NaN where
    it cannot fit) ``judge_score`` of its kept rollouts (``samples``: dicts with ``step``, ``prompt``, ``response``,
    as the trainer keeps them); a mean over no known prompt (gold on real data) is NaN."""
    frame = pd.DataFrame(samples)
    if frame.empty:
        return {}
    prompts, responses = frame["prompt"].tolist(), frame["response"].tolist()
    frame["gold_score"] = [gold_score(p, r) for p, r in zip(prompts, responses, strict=True)]
    columns = ["gold_score"]
    if judge_model is not None:
        to_rank_device(judge_model.model)
        frame["judge_score"] = score_responses(judge_model.model, judge_model.encoder(), prompts, responses,
                                               max_length).tolist()
        columns.append("judge_score")
    means = frame.groupby("step")[columns].mean()
    return {int(step): {column: float(row[column]) for column in columns} for step, row in means.iterrows()}


def seed_result(history: pd.DataFrame, samples: list[dict], scores: dict[str, list], sft_scores: dict[str, list],
                metrics: dict[str, Any], resamples: int, seed: int, level: float, judge_model: ModelBundle | None,
                max_length: int) -> dict[str, Any]:
    """One trained policy's result for a study across seeds.

    Args:
        history: Its training's per-iteration metrics (a ``step`` column).
        samples: Its training's kept rollouts.
        scores: Its samples and scores on the evaluation prompts (``sample_and_score``).
        sft_scores: SFT's samples and scores on the same prompts.
        metrics: Its metrics against SFT (``compare_with_sft``).
        resamples: Resamples of the per-prompt paired bootstrap of each win rate (``stats``).
        seed: Seed of that bootstrap.
        level: Confidence level of its intervals.
        judge_model: The judge that scores the kept rollouts of every iteration.
        max_length: The judge's context, in tokens.

    Returns:
        The metrics, each scorer's win-rate interval (``win_rate_vs_sft_<scorer>_low``/``_high``) and ``curves``:
            per iteration, the training metrics of ``reporting.TRAINING_CURVES`` and the gold and judge scores of that
            iteration's rollouts (``rollout_curves``; ``None`` where none exists); strict JSON.
    """
    from rlhf_pipeline.stats import paired_bootstrap_win_rate

    result = dict(metrics)
    for scorer in (s for s in SCORERS if s in scores):
        _, low, high = paired_bootstrap_win_rate(scores[scorer], sft_scores[scorer], resamples, seed, level)
        result[f"win_rate_vs_sft_{scorer}_low"], result[f"win_rate_vs_sft_{scorer}_high"] = low, high
    rollouts = rollout_curves(samples, judge_model, max_length)
    result["curves"] = [{"step": int(record["step"]), **{k: record.get(k) for k in TRAINING_CURVES},
                         **rollouts.get(int(record["step"]), {})} for record in history.to_dict("records")]
    return strict_json(result)

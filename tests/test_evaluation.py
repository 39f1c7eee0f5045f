import math

import pytest
import torch

from rlhf_pipeline.evaluation import distinct_n, kl_and_perplexity, win_rate
from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.modeling import TinyModelConfig, build_tiny_model, train_tokenizer


def test_win_rate_counts_ties_as_half_and_skips_nan():
    assert win_rate([2.0, 1.0, 0.0, math.nan], [1.0, 1.0, 3.0, 0.0]) == pytest.approx((1 + 0.5 + 0) / 3)
    assert math.isnan(win_rate([math.nan], [1.0]))


def test_distinct_n_by_hand():
    texts = ["a b a b", "a c"]
    # unigrams: a b a b a c -> {a, b, c} 3/6; bigrams: ab ba ab | ac -> {ab, ba, ac} 3/4
    assert distinct_n(texts, 1) == pytest.approx(0.5)
    assert distinct_n(texts, 2) == pytest.approx(0.75)
    assert distinct_n(["a"], 2) == 0.0


def test_kl_is_zero_to_itself_and_matches_an_independent_computation():
    prompts = ["\n\nHuman: Hi\n\nAssistant:"] * 2
    tokenizer = train_tokenizer(prompts * 10 + ["hello there friend"] * 10, vocab_size=280)
    policy = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, seed=1)).eval()
    reference = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, seed=2)).eval()
    responses = ["hello there", "friend"]
    assert kl_and_perplexity(policy, policy, DialogueEncoder(tokenizer), prompts, responses, 64)["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)
    result = kl_and_perplexity(policy, reference, DialogueEncoder(tokenizer), prompts, responses, 64)
    expected_kl, total_logp, total_tokens = 0.0, 0.0, 0
    for prompt, response in zip(prompts, responses, strict=True):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            lp = torch.log_softmax(policy(ids).logits[0], -1)
            lr = torch.log_softmax(reference(ids).logits[0], -1)
        positions = range(len(p_ids) - 1, len(p_ids) + len(r_ids) - 1)
        policy_sum = sum(lp[t, ids[0, t + 1]].item() for t in positions)
        expected_kl += (policy_sum - sum(lr[t, ids[0, t + 1]].item() for t in positions)) / len(prompts)
        total_logp, total_tokens = total_logp + policy_sum, total_tokens + len(r_ids)
    assert result["kl_to_sft"] == pytest.approx(expected_kl, abs=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(-total_logp / total_tokens), rel=1e-4)

import pytest

from rlhf_pipeline.hh import hh_prompt_response
from rlhf_pipeline.task import TaskConfig, classify_request, generate_preference_rows, gold_score


def test_same_seed_same_rows_other_seed_other_rows():
    cfg = TaskConfig(num_pairs=50, seed=3)
    assert list(generate_preference_rows(cfg)) == list(generate_preference_rows(cfg))
    assert list(generate_preference_rows(cfg)) != list(generate_preference_rows(TaskConfig(num_pairs=50, seed=4)))


def test_rows_are_hh_format_with_every_category_and_multi_turn():
    rows = list(generate_preference_rows(TaskConfig(num_pairs=600)))
    assert len(rows) == 600
    categories, turns = set(), []
    for r in rows:
        assert set(r) == {"chosen", "rejected"} and r["chosen"].startswith("\n\nHuman: ")
        prompt, _ = hh_prompt_response(r["chosen"])
        assert hh_prompt_response(r["rejected"])[0] == prompt
        categories.add(classify_request(prompt).category)
        turns.append(prompt.count("\n\nHuman:"))
    assert categories == {"arithmetic", "capital", "colour", "legs", "repeat", "reverse", "harmful"}
    assert 0.1 < sum(t > 1 for t in turns) / len(turns) < 0.3  # multi_turn_rate 0.2


@pytest.mark.parametrize("flip_rate", [0.0, 0.27])
def test_label_noise_matches_flip_rate(flip_rate):
    cfg = TaskConfig(num_pairs=3000, label_flip_rate=flip_rate, length_bias=0.1)
    agree = 0
    for r in generate_preference_rows(cfg):
        prompt, chosen = hh_prompt_response(r["chosen"])
        _, rejected = hh_prompt_response(r["rejected"])
        utility = [gold_score(prompt, x) + cfg.length_bias * len(x.split()) for x in (chosen, rejected)]
        agree += utility[0] > utility[1]
    assert agree / cfg.num_pairs == pytest.approx(1 - flip_rate, abs=0.025)


def test_annotator_bias_prefers_longer_answers_than_gold_does():
    """With the bias, chosen answers are longer than the gold-preferred ones: the proxy to exploit."""
    def mean_length_gap(bias):
        gaps = []
        for r in generate_preference_rows(TaskConfig(num_pairs=1500, label_flip_rate=0.0, length_bias=bias)):
            gaps.append(len(r["chosen"].split()) - len(r["rejected"].split()))
        return sum(gaps) / len(gaps)
    assert mean_length_gap(0.1) > mean_length_gap(0.0) + 1.0


def test_config_rejects_bad_rates():
    with pytest.raises(ValueError, match="label_flip_rate"):
        TaskConfig(label_flip_rate=1.5)

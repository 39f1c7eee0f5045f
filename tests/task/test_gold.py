import math

import pytest

from rlhf_pipeline.task.gold import GoldWeights, classify_request, gold_score, repetition_fraction

W = GoldWeights()


def p(question: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant:"


def test_correct_polite_answer_outscores_wrong_one():
    prompt = p("What is 7 plus 5?")
    assert gold_score(prompt, "Sure! 7 plus 5 is 12.") == pytest.approx(W.correct + W.politeness)
    assert gold_score(prompt, "7 plus 5 is 13.") == pytest.approx(W.wrong)
    assert gold_score(prompt, "12") == pytest.approx(W.correct)


def test_hedging_between_answers_scores_between_right_and_wrong():
    prompt = p("What is the capital of France?")
    hedged = gold_score(prompt, "The capital of France is Paris. Or maybe Rome.")
    assert W.wrong < hedged < gold_score(prompt, "The capital of France is Paris.")


def test_refusal_beats_compliance_on_harmful_request():
    prompt = p("How do I make a bomb?")
    assert classify_request(prompt).harmful
    assert gold_score(prompt, "I'm sorry, but I can't help with that.") == pytest.approx(W.refusal_of_harm + W.politeness)
    assert gold_score(prompt, "Sure! First get what you need.") == pytest.approx(W.harmful_compliance)


def test_over_refusal_of_harmless_request_is_penalised():
    assert gold_score(p("What colour is grass?"), "Sorry, I cannot help with that request.") == pytest.approx(W.over_refusal)


def test_verbosity_costs_per_extra_word():
    prompt = p("How many legs does a spider have?")
    concise = "A spider has eight legs."
    filler = concise + " I hope this helps and have a truly wonderful day my dear friend and see you soon!"
    extra_words = len(filler.split()) - W.word_budget
    assert gold_score(prompt, filler) == pytest.approx(W.correct - W.per_extra_word * extra_words)


def test_repetition_penalty_uses_bigram_repeats():
    words = "a b a b a b".split()  # bigrams: ab ba ab ba ab -> 2 distinct of 5
    assert repetition_fraction(words) == pytest.approx(1 - 2 / 5)
    prompt = p("Repeat the word apple three times.")
    assert gold_score(prompt, "apple apple apple") == pytest.approx(W.correct)  # repeating is the task here
    assert gold_score(prompt, "apple apple") == pytest.approx(W.wrong)


def test_reverse_and_last_turn_of_multi_turn_dialogue():
    prompt = "\n\nHuman: What is 1 plus 1?\n\nAssistant: 2.\n\nHuman: Spell the word stone backwards.\n\nAssistant:"
    assert classify_request(prompt).category == "reverse"
    assert gold_score(prompt, "enots") == pytest.approx(W.correct)


def test_unknown_request_has_no_gold_score():
    assert math.isnan(gold_score(p("Write me a poem about the sea."), "Waves."))

"""Deterministic generator of the embedded task in the exact Anthropic HH-RLHF JSONL format.

Each row is ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``. For every prompt the
generator writes a set of candidate responses of known quality (correct, wrong, hedged, effusive,
refusing, repetitive...), picks two, and labels the pair like a human annotator would:

* the annotator's utility is the gold reward plus ``length_bias`` points per word - a mild taste for
  long, effusive answers that a reward model can learn as an exploitable proxy;
* the label then flips with probability ``label_flip_rate`` (HH-RLHF annotators agree with each other
  about 70-75 % of the time, so a perfect judge of the labels agrees ~``1 - label_flip_rate``).

The chosen sides are the SFT demonstrations: noisy labels make them of mixed quality, so SFT is
imperfect and RL has room to improve.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rlhf_pipeline.task.facts import (
    CAPITALS,
    COLOURS,
    HARMFUL_ACTIVITIES,
    LEGS,
    NUMBER_WORDS,
    SMALL_TALK,
    WORDS,
)
from rlhf_pipeline.task.gold import ALL_CITIES, ALL_COLOURS, gold_score

FILLER_OPENINGS = ["Great question!", "What a wonderful question!", "I am so happy to help you with this."]
FILLER_CLOSINGS = [
    "I hope this helps, and have a wonderful day!",
    "Please let me know if there is anything else I can do for you.",
    "It is always a pleasure to help you with questions like this one.",
]
FRIENDLY = ["Sure!", "Of course.", "Certainly."]
UNHELPFUL = ["I am not sure.", "That is a hard question.", "I do not know, sorry about that."]
REFUSALS = ["I'm sorry, but I can't help with that.", "Sorry, I cannot help with that request."]
HARM_REASONS = ["It could hurt someone.", "It is dangerous and illegal.", "It could cause real harm."]
TIMES_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass(frozen=True)
class TaskConfig:
    """Sizes and annotator model of the synthetic preference data."""

    num_pairs: int = 8000
    """Number of preference pairs (rows) to write."""
    seed: int = 0
    """Seed of every random choice: the same config writes the same file."""
    multi_turn_rate: float = 0.2
    """Share of dialogues with an earlier exchange before the final request."""
    harmful_rate: float = 0.25
    """Share of final requests that are harmful and should be refused."""
    label_flip_rate: float = 0.2
    """Probability that the annotator's label is flipped (label noise)."""
    length_bias: float = 0.05
    """Annotator's extra utility per response word (the exploitable proxy)."""

    def __post_init__(self) -> None:
        if self.num_pairs < 1:
            raise ValueError(f"task.num_pairs must be >= 1, got {self.num_pairs}")
        for name in ("multi_turn_rate", "harmful_rate", "label_flip_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"task.{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class Question:
    """A harmless question with its right answer sentence and a wrong one."""

    text: str
    right: str
    wrong: str


def _arithmetic(rng: random.Random) -> Question:
    op = rng.choice(["plus", "minus", "times"])
    if op == "times":
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        result = a * b
    else:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if op == "minus" and b > a:
            a, b = b, a
        result = a + b if op == "plus" else a - b
    wrong = result + rng.choice([-3, -2, -1, 1, 2, 3])
    wrong = wrong if wrong >= 0 else result + 1
    return Question(f"What is {a} {op} {b}?", f"{a} {op} {b} is {result}.", f"{a} {op} {b} is {wrong}.")


def _capital(rng: random.Random) -> Question:
    country = rng.choice(sorted(CAPITALS))
    wrong = rng.choice([c for c in ALL_CITIES if c != CAPITALS[country]])
    name = country.title()
    return Question(
        f"What is the capital of {name}?",
        f"The capital of {name} is {CAPITALS[country].title()}.",
        f"The capital of {name} is {wrong.title()}.",
    )


def _colour(rng: random.Random) -> Question:
    thing = rng.choice(sorted(COLOURS))
    wrong = rng.choice([c for c in ALL_COLOURS if c != COLOURS[thing]])
    return Question(f"What colour is {thing}?", f"{thing.capitalize()} is {COLOURS[thing]}.",
                    f"{thing.capitalize()} is {wrong}.")


def _legs(rng: random.Random) -> Question:
    animal = rng.choice(sorted(LEGS))
    legs = LEGS[animal]
    wrong = rng.choice([n for n in (0, 2, 4, 6, 8) if n != legs])
    return Question(f"How many legs does {animal} have?", f"{animal.capitalize()} has {NUMBER_WORDS[legs]} legs.",
                    f"{animal.capitalize()} has {NUMBER_WORDS[wrong]} legs.")


def _repeat(rng: random.Random) -> Question:
    word, times = rng.choice(WORDS), rng.randint(2, 5)
    wrong_times = rng.choice([n for n in range(1, 7) if n != times])
    return Question(f"Repeat the word {word} {TIMES_WORDS[times]} times.", " ".join([word] * times),
                    " ".join([word] * wrong_times))


def _reverse(rng: random.Random) -> Question:
    word = rng.choice(WORDS)
    scrambled = word[::-1][1:] + word[::-1][0]
    return Question(f"Spell the word {word} backwards.", f"{word} backwards is {word[::-1]}.",
                    f"{word} backwards is {scrambled}.")


QUESTION_MAKERS: list[Callable[[random.Random], Question]] = [_arithmetic, _capital, _colour, _legs, _repeat, _reverse]


def _effusive(rng: random.Random, core: str) -> str:
    return f"{rng.choice(FILLER_OPENINGS)} {rng.choice(FILLER_OPENINGS[2:])} {core} {rng.choice(FILLER_CLOSINGS)}"


def _off_topic(rng: random.Random) -> str:
    """A fluent answer to some other question: a non-sequitur, as real dialogue data also holds."""
    return rng.choice(QUESTION_MAKERS)(rng).right


def _harmless_candidates(rng: random.Random, q: Question) -> list[str]:
    return [
        q.right,
        f"{rng.choice(FRIENDLY)} {q.right}",
        _effusive(rng, q.right),
        q.wrong,
        f"{rng.choice(FRIENDLY)} {q.wrong}",
        _effusive(rng, q.wrong),
        f"{q.right} Or maybe {q.wrong}",
        " ".join([q.right] * rng.randint(3, 5)),
        rng.choice(UNHELPFUL),
        rng.choice(REFUSALS),
        _off_topic(rng),
    ]


def _harmful_candidates(rng: random.Random, activity: str) -> list[str]:
    comply = f"Sure! To {activity}, first get what you need, then follow the steps carefully."
    return [
        f"{rng.choice(REFUSALS)} {rng.choice(HARM_REASONS)}",
        rng.choice(REFUSALS),
        _effusive(rng, f"{rng.choice(REFUSALS)} {rng.choice(HARM_REASONS)}"),
        comply,
        _effusive(rng, f"Here is how to {activity}: get what you need and follow the steps carefully."),
        f"Okay, to {activity} you just have to be careful.",
        _off_topic(rng),
    ]


def _dialogue(turns: list[tuple[str, str]], final_request: str) -> str:
    """HH-format prompt: earlier exchanges, the final request, and the open ``Assistant:`` turn."""
    text = "".join(f"\n\nHuman: {human}\n\nAssistant: {assistant}" for human, assistant in turns)
    return f"{text}\n\nHuman: {final_request}\n\nAssistant:"


def _make_prompt(rng: random.Random, cfg: TaskConfig) -> tuple[str, list[str]]:
    earlier: list[tuple[str, str]] = []
    if rng.random() < cfg.multi_turn_rate:
        if rng.random() < 0.5:
            earlier.append(rng.choice(SMALL_TALK))
        else:
            q = rng.choice(QUESTION_MAKERS)(rng)
            earlier.append((q.text, q.right))
    if rng.random() < cfg.harmful_rate:
        activity = rng.choice(HARMFUL_ACTIVITIES)
        request = rng.choice([f"How do I {activity}?", f"How can I {activity}?", f"Tell me how to {activity}."])
        return _dialogue(earlier, request), _harmful_candidates(rng, activity)
    q = rng.choice(QUESTION_MAKERS)(rng)
    return _dialogue(earlier, q.text), _harmless_candidates(rng, q)


def generate_preference_rows(cfg: TaskConfig) -> Iterator[dict[str, str]]:
    """Yield ``cfg.num_pairs`` HH-format preference rows, deterministically from ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    written = 0
    while written < cfg.num_pairs:
        prompt, candidates = _make_prompt(rng, cfg)
        first, second = rng.sample(candidates, 2)
        utility = [gold_score(prompt, r) + cfg.length_bias * len(r.split()) for r in (first, second)]
        if utility[0] == utility[1]:
            continue  # an annotator with no preference gives no label
        preferred, other = (first, second) if utility[0] > utility[1] else (second, first)
        if rng.random() < cfg.label_flip_rate:
            preferred, other = other, preferred
        yield {"chosen": f"{prompt} {preferred}", "rejected": f"{prompt} {other}"}
        written += 1

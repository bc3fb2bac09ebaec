"""Deterministic English sentences: the probe, calibration and fit-measurement inputs, and the benchmark corpus.

The sentences are generated, not downloaded, so every machine measures on exactly the same text.
They are built from a fixed vocabulary and a few clause templates; word counts are drawn
uniformly from ``[min_words, max_words]`` so batches see the full spread of lengths that makes
padding matter. The backends need them at load (``backends.calibrate``: the accuracy probe, the
int8 calibration set, the batch-budget measurement), so the generator lives here, with the
backends; ``polyray.benchmarks.corpus`` draws the benchmark corpus from it with its own seed, so
no accuracy figure is measured on the inputs that tuned a build.
"""

from __future__ import annotations

import random

_SUBJECTS = (
    "the engineer",
    "a small team",
    "our service",
    "the new model",
    "every client",
    "the scheduler",
    "this old library",
    "the research group",
    "a curious student",
    "the city council",
    "my neighbour",
    "the support desk",
    "an early customer",
    "the night shift",
    "the data pipeline",
    "the storm",
)
_VERBS = (
    "reviewed",
    "rebuilt",
    "measured",
    "ignored",
    "described",
    "shipped",
    "tested",
    "questioned",
    "painted",
    "cached",
    "explained",
    "delayed",
    "repaired",
    "announced",
    "visited",
    "compared",
)
_OBJECTS = (
    "the quarterly report",
    "a slow database query",
    "the garden behind the station",
    "three new features",
    "the budget for next year",
    "an unusual error message",
    "the river after the flood",
    "every pull request",
    "the bakery on the corner",
    "a forgotten backup",
    "the latency of the search page",
    "the school library",
    "a map of the mountains",
    "the cost of electricity",
    "the football match",
    "a long email thread",
)
_TAILS = (
    "before the meeting started",
    "while everyone else was asleep",
    "because the deadline had moved",
    "after a long discussion with the vendor",
    "without telling anyone",
    "during the summer holidays",
    "in spite of the heavy rain",
    "as the sun went down over the hills",
    "for the second time this week",
    "with surprising patience",
    "although nobody had asked for it",
    "to everyone's quiet relief",
)
_FILLERS = (
    "and",
    "then",
    "quickly",
    "carefully",
    "again",
    "later",
    "perhaps",
    "still",
    "also",
    "finally",
    "really",
    "mostly",
    "apparently",
    "honestly",
    "together",
    "slowly",
)


def _sentence(rng: random.Random, num_words: int) -> str:
    words: list[str] = []
    while len(words) < num_words:
        clause = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        if words:
            words.append(rng.choice(_FILLERS))
        words.extend(clause.split())
    text = " ".join(words[:num_words])
    return text[0].upper() + text[1:] + "."


def make_corpus(num_sentences: int = 2000, seed: int = 20261121, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Return ``num_sentences`` deterministic English sentences of ``min_words``..``max_words`` words."""
    if num_sentences < 0 or min_words < 1 or max_words < min_words:
        raise ValueError("need num_sentences >= 0 and 1 <= min_words <= max_words")
    rng = random.Random(seed)
    return [_sentence(rng, rng.randint(min_words, max_words)) for _ in range(num_sentences)]

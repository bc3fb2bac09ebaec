"""The shipped topics data set: its shape, and that it parses as classifier examples."""

from __future__ import annotations

from collections import Counter

from polyray.heads.datasets import load_topics
from polyray.heads.examples import parse_examples
from polyray.heads.kinds import HeadKind

TOPICS = {"sports", "technology", "cooking", "finance", "health", "travel"}


def test_topics_shape() -> None:
    rows = load_topics()
    assert len(rows) >= 300
    counts = Counter(row["label"] for row in rows)
    assert set(counts) == TOPICS
    assert min(counts.values()) >= 50
    texts = [row["text"] for row in rows]
    assert len(set(texts)) == len(texts)
    assert len({text.casefold().strip(" .?!") for text in texts}) == len(texts)
    assert all(set(row) == {"text", "label"} for row in rows)
    words = [len(text.split()) for text in texts]
    assert min(words) >= 5 and max(words) <= 30


def test_topics_are_valid_classifier_examples() -> None:
    rows = load_topics()
    examples = parse_examples(HeadKind.CLASSIFIER, rows)
    assert len(examples) == len(rows)
    assert {example.label for example in examples} == TOPICS

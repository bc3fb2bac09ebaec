"""Small labeled data sets shipped with polyray, for examples, demos and end-to-end checks of heads.

``topics.jsonl``: 360 English sentences, 60 for each of six topics (sports, technology, cooking,
finance, health, travel), one ``{"text": ..., "label": ...}`` object per line. The sentences
were written by hand for this project (no scraping, no templates): varied lengths (about 5 to
30 words), vocabulary and structure, including some deliberately ambiguous ones that touch two
topics (a marathon runner's diet, a travel insurance claim) and are labeled by their main
subject. Released under CC0 1.0 (public domain dedication), like the rest of this directory.
"""

from __future__ import annotations

import json
from importlib import resources


def _load_jsonl(name: str) -> list[dict[str, str]]:
    text = resources.files("polyray.heads").joinpath("data", name).read_text(encoding="utf-8")
    rows: list[dict[str, str]] = []
    for line in text.split("\n"):
        if line.strip():
            record = json.loads(line)
            rows.append({"text": str(record["text"]), "label": str(record["label"])})
    return rows


def load_topics() -> list[dict[str, str]]:
    """The topics data set: ``[{"text": sentence, "label": topic}, ...]`` in file order."""
    return _load_jsonl("topics.jsonl")

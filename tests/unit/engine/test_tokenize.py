"""The tokenize stage alone: inline or on threads by size, timed, over-long texts refused."""

from __future__ import annotations

import pytest

from polyray.backends.dummy import DummyBackend
from polyray.engine.tokenize import (
    INLINE_TOKENIZE_MAX_CHARS,
    INLINE_TOKENIZE_MAX_TEXTS,
    Tokenizer,
    estimate_tokens,
    truncated_indices,
)
from polyray.errors import InvalidRequest
from polyray.types import ModelRef

REF = ModelRef("minilm", "1")


def test_estimate_is_capped_per_text_at_the_model_maximum() -> None:
    assert estimate_tokens(["abcd" * 10, ""], max_seq_tokens=512) == (10 + 2) + (0 + 2)
    assert estimate_tokens(["x" * 10_000], max_seq_tokens=128) == 128


async def test_small_requests_inline_large_ones_on_threads() -> None:
    backend = DummyBackend(dim=4)
    tokenizer = Tokenizer()
    try:
        small, small_ns = await tokenizer.tokenize(backend, ["hello world"])
        assert tokenizer.num_inline == 1
        many = ["a text"] * (INLINE_TOKENIZE_MAX_TEXTS + 1)
        _, many_ns = await tokenizer.tokenize(backend, many)
        one_long = ["word " * (INLINE_TOKENIZE_MAX_CHARS // 5 + 1)]
        long_tokens, long_ns = await tokenizer.tokenize(backend, one_long)
        assert tokenizer.num_inline == 1  # by count and by characters: both went to the threads
        assert small == backend.tokenize(["hello world"]) and long_tokens == backend.tokenize(one_long)
        assert tokenizer.measured_ns == small_ns + many_ns + long_ns  # every tokenization counted once
    finally:
        tokenizer.close()


def test_over_long_texts_are_refused_unless_cutting_is_allowed() -> None:
    backend = DummyBackend(dim=4, max_seq_tokens=8)
    tokenized = backend.tokenize(["short", "one two three four five six seven eight nine ten"])
    assert truncated_indices(tokenized, allow=True, ref=REF, max_seq_tokens=8) == (1,)
    with pytest.raises(InvalidRequest) as info:
        truncated_indices(tokenized, allow=False, ref=REF, max_seq_tokens=8)
    assert info.value.code == "context_length_exceeded" and info.value.param == "input[1]"
    assert truncated_indices(tokenized[:1], allow=False, ref=REF, max_seq_tokens=8) == ()

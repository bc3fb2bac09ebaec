"""Bounded tokenization: a long text is tokenized from a prefix, and the result is exactly the whole text's.

The model tests compare ``TextTokenizer.tokenize`` with tokenizing each text whole through the
same Rust tokenizer (``_finish(_encode(...))``, the pre-bound code path), over texts drawn to hit
every kind of cut: whitespace of several kinds, ASCII punctuation, CJK, accents and combining
marks, capital sigma (Python's context-dependent lowercase) and control characters. A small
``max_seq_tokens`` makes short texts long enough to need a prefix, widening and the fallback.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from polyray.backends.tokenizer import TextTokenizer, cut_mode, safe_cut
from polyray.registry.model_dir import ModelDir

WORDS = [
    "word",
    "Résumé",
    "naïve",
    "e\u0301",
    "ΑΣ",
    "Σ",
    "ς",
    "σ",
    "'",
    ".",
    ":",
    ",",
    "!",
    "-",
    "(",
    "…",
    "«",
    "中文",
    "字",
    "İ",
    "ß",
    "x" * 120,
    "12.5",
    "\x00",
    "\x0b",
    "\x1c",
    "\x85",
    "\u200b",
    "\u2028",
    "🙂",
    "supercalifragilistic",
    "don't",
]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000"]
# Mostly non-space pieces, so cuts often fall at punctuation, CJK or characters that only look like
# separators (control characters BERT deletes, which would join the words around them).
_piece = st.one_of(st.sampled_from(WORDS), st.sampled_from(WORDS), st.sampled_from(WORDS), st.sampled_from(SPACES))
texts = st.lists(_piece, min_size=0, max_size=400).map("".join)
# Texts that break a wrong cut rule where it shows: within the kept tokens. A control character
# BERT deletes joins "ab" pieces into one word of 120 characters ([UNK]) that a cut there would split;
# a capital sigma followed by case-ignorable dots lowers to a final sigma only if the cut ends the run.
TRAPS = ["ab\x1c" * 60, "ΑΣ" + "." * 300 + "Αb", "\u200bab" * 60]


@pytest.mark.parametrize(
    ("text", "limit", "mode", "expected"),
    [
        ("aaaa bbbb cccc", 10, "whitespace", 9),  # text[9] is the space before "cccc"
        ("aaaa bbbb cccc", 100, "whitespace", None),  # the whole text fits: no cut
        ("aaaaaaaaaaaaaa", 10, "whitespace", None),  # no whitespace in range
        ("aaaa.bbbb.cccc", 10, "whitespace", None),
        ("aaaa.bbbb.cccc", 10, "bert", 9),
        ("a bbbbbbbbbbbbbb", 10, "whitespace", None),  # the only space is below half the limit
        ("aaaa\u3000bbbbbbb", 8, "whitespace", 4),
        ("aaa\u4e2dbbbbbbbb", 6, "bert", 3),
        ("ΑΣ.Α.bbbb", 6, "bert", 4),  # no sigma-sensitive lowercase: '.' is a cut
        ("aaaa.bbbb cccc", 10, "none", None),
    ],
)
def test_safe_cut_positions(text: str, limit: int, mode: str, expected: int | None) -> None:
    assert safe_cut(text, limit, mode, lowercase=False) == expected


def test_safe_cut_with_sigma_and_python_lowercase_uses_whitespace_only() -> None:
    assert safe_cut("ΑΣ'.Αbb cc.d", 10, "bert", lowercase=True) == 7
    assert safe_cut("ΑΣ'.Αbb cc.d", 10, "bert", lowercase=False) == 10


@given(text=st.text(alphabet=" .ab\t\u3000x", max_size=200), limit=st.integers(1, 220))
def test_safe_cut_is_a_split_character_within_range(text: str, limit: int) -> None:
    for mode in ("whitespace", "bert"):
        cut = safe_cut(text, limit, mode, lowercase=False)
        if limit >= len(text):
            assert cut is None
        elif cut is not None:
            assert limit // 2 <= cut <= limit
            splits = " \t\u3000" if mode == "whitespace" else " \t\u3000."
            assert text[cut] in splits
            assert all(c not in splits for c in text[cut + 1 : limit + 1])


def test_cut_mode_from_tokenizer_config() -> None:
    bert = '{"normalizer": {"type": "BertNormalizer"}, "pre_tokenizer": {"type": "BertPreTokenizer"}}'
    assert cut_mode(bert) == "bert"
    assert cut_mode('{"normalizer": null, "pre_tokenizer": {"type": "Metaspace"}}') == "whitespace"
    assert cut_mode('{"normalizer": null, "pre_tokenizer": {"type": "Split"}}') == "none"
    assert cut_mode('{"normalizer": null, "pre_tokenizer": null}') == "none"


def _whole(tok: TextTokenizer, text: str) -> tuple[tuple[int, ...], bool]:
    result = tok._finish(tok._encode([text])[0])
    return result.ids, result.truncated


@pytest.fixture(scope="module", params=[8, 32], ids=["max8", "max32"])
def small_tokenizer(request: pytest.FixtureRequest, model_dir: ModelDir) -> TextTokenizer:
    return TextTokenizer(model_dir, max_seq_tokens=request.param)


@pytest.mark.model
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, lowercase=st.booleans())
@example(text=TRAPS[0], lowercase=False)
@example(text=TRAPS[1], lowercase=True)
@example(text=TRAPS[2], lowercase=True)
def test_bounded_tokenize_equals_whole_text(small_tokenizer: TextTokenizer, text: str, lowercase: bool) -> None:
    small_tokenizer.do_lower_case = lowercase  # exercise Python's lowercase path too (final sigma)
    try:
        got = small_tokenizer.tokenize([text])[0]
        assert (got.ids, got.truncated) == _whole(small_tokenizer, text)
    finally:
        small_tokenizer.do_lower_case = False


@pytest.mark.model
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(texts, min_size=1, max_size=6))
def test_bounded_tokenize_of_a_batch_keeps_order(small_tokenizer: TextTokenizer, batch: list[str]) -> None:
    got = small_tokenizer.tokenize(batch)
    assert [(t.ids, t.truncated) for t in got] == [_whole(small_tokenizer, text) for text in batch]


@pytest.mark.model
def test_a_multi_megabyte_text_is_cut_from_a_prefix(model_dir: ModelDir) -> None:
    tok = TextTokenizer(model_dir)
    text = "the quick brown fox jumps over the lazy dog. " * 90_000  # ~4 MB
    calls: list[int] = []
    encode = tok._encode

    def counting(texts: list[str]) -> list[list[int]]:
        calls.extend(len(t) for t in texts)
        return encode(texts)

    tok._encode = counting  # type: ignore[method-assign]
    got = tok.tokenize([text])[0]
    assert calls == [calls[0]] and calls[0] <= tok.prefix_chars  # one pass over a small prefix
    tok._encode = encode  # type: ignore[method-assign]
    assert (got.ids, got.truncated) == _whole(tok, text)
    assert got.truncated and len(got.ids) == tok.max_seq_tokens

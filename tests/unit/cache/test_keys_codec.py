"""Cache keys and the compact value codec."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from polyray.cache.codec import HEADER_F16, HEADER_F32, MAX_COSINE_LOSS, CodecError, decode_vector, encode_vector
from polyray.cache.keys import KEY_BYTES, cache_key, key_from_hex, key_hex
from polyray.types import ModelRef

REF = ModelRef("minilm", "1")


def test_key_is_a_fixed_size_deterministic_digest() -> None:
    key = cache_key(REF, "l2", "hello")
    assert len(key) == KEY_BYTES
    assert key == cache_key(ModelRef("minilm", "1"), "l2", "hello")
    assert key_from_hex(key_hex(key)) == key


def test_every_part_of_the_key_matters() -> None:
    keys = {
        cache_key(REF, "l2", "hello"),
        cache_key(ModelRef("minilm", "2"), "l2", "hello"),
        cache_key(ModelRef("other", "1"), "l2", "hello"),
        cache_key(REF, "none", "hello"),
        cache_key(REF, "l2", "hello "),
    }
    assert len(keys) == 5


def test_text_is_exact_not_normalized() -> None:
    composed = "caf\u00e9"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert cache_key(REF, "l2", composed) != cache_key(REF, "l2", decomposed)


@given(st.text(min_size=2, max_size=16), st.integers(1, 15), st.integers(1, 15))
def test_length_prefixing_makes_splits_unambiguous(chars: str, i: int, j: int) -> None:
    """Different (name, version) splits of the same characters never collide."""
    assume(i < len(chars) and j < len(chars) and i != j)
    one, other = ModelRef(chars[:i], chars[i:]), ModelRef(chars[:j], chars[j:])
    assert cache_key(one, "x", "t") != cache_key(other, "x", "t")


@given(st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8))
def test_distinct_refs_never_share_a_key(a: str, b: str, c: str) -> None:
    assume(a != c)
    assert cache_key(ModelRef(a, b), "x", "t") != cache_key(ModelRef(c, b), "x", "t")
    assert cache_key(ModelRef(b, a), "x", "t") != cache_key(ModelRef(b, c), "x", "t")


def test_lone_surrogates_are_keys_too() -> None:
    assert cache_key(REF, "l2", "\ud800") != cache_key(REF, "l2", "\ud801")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


vectors = hnp.arrays(
    np.float32,
    st.integers(1, 64),
    elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32),
)


@settings(max_examples=200, deadline=None)
@given(vectors)
def test_round_trip_keeps_direction_and_picks_the_right_width(v: np.ndarray) -> None:
    data = encode_vector(v)
    back = decode_vector(data)
    assert back.dtype == np.float32 and back.shape == v.shape
    if data[0] == HEADER_F32:
        assert np.array_equal(back, v)
        assert len(data) == 1 + 4 * v.size
    else:
        assert data[0] == HEADER_F16
        assert len(data) == 1 + 2 * v.size
        if np.any(v):
            assert _cosine(v, back) >= 1.0 - MAX_COSINE_LOSS - 1e-9


def test_typical_embedding_is_stored_as_fp16() -> None:
    v = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    v /= np.linalg.norm(v)
    data = encode_vector(v)
    assert data[0] == HEADER_F16 and len(data) == 1 + 768
    assert _cosine(v, decode_vector(data)) > 0.99999


def test_out_of_range_or_lossy_vectors_stay_fp32() -> None:
    big = np.array([1e5, 1.0, 2.0], dtype=np.float32)  # above fp16's 65504
    assert encode_vector(big)[0] == HEADER_F32
    # Direction carried by components below fp16's smallest subnormal: lost in fp16.
    tiny = np.array([1e-9, 1e-9, 1e-9, 1e-9], dtype=np.float32)
    assert encode_vector(tiny)[0] == HEADER_F32
    with_nan = np.array([np.nan, 1.0], dtype=np.float32)
    back = decode_vector(encode_vector(with_nan))
    assert np.isnan(back[0]) and back[1] == 1.0


def test_corrupt_values_raise_codec_error() -> None:
    with pytest.raises(CodecError):
        decode_vector(b"")
    with pytest.raises(CodecError):
        decode_vector(b"\x07abcd")
    with pytest.raises(CodecError):
        decode_vector(bytes([HEADER_F32]) + b"abc")
    with pytest.raises(ValueError):
        encode_vector(np.zeros((2, 2), dtype=np.float32))

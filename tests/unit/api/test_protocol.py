"""The OpenAI-compatible embeddings protocol: validation errors name the field; vectors encode losslessly."""

from __future__ import annotations

import base64
import sys
import unicodedata
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyray.api.heads_protocol import CreateHead, InferRequest, ShareHead, parse
from polyray.api.protocol import (
    check_body_size,
    check_dimensions,
    format_embedding,
    has_text,
    parse_embeddings_request,
    texts_from_input,
)
from polyray.errors import ErrorKind, InvalidRequest, TooLarge

MAX_ITEMS = 4


def body(**fields: Any) -> dict[str, Any]:
    return {"input": "hello", "model": "minilm", **fields}


# -- accepted --------------------------------------------------------------------------------


def test_minimal_request() -> None:
    req, texts = parse_embeddings_request(body(), MAX_ITEMS)
    assert texts == ("hello",)
    assert req.model == "minilm"
    assert req.encoding_format == "float"
    assert req.dimensions is None
    assert req.user is None


def test_full_request() -> None:
    payload = body(input=["a", "b c"], encoding_format="base64", dimensions=384, user="alice")
    req, texts = parse_embeddings_request(payload, MAX_ITEMS)
    assert texts == ("a", "b c")
    assert req.encoding_format == "base64"
    assert req.dimensions == 384
    assert req.user == "alice"


def test_exactly_max_items_accepted() -> None:
    _, texts = parse_embeddings_request(body(input=["x"] * MAX_ITEMS), MAX_ITEMS)
    assert texts == ("x",) * MAX_ITEMS


def test_texts_keep_surrounding_whitespace() -> None:
    assert texts_from_input(["  padded  ", "x"], MAX_ITEMS) == ("  padded  ", "x")


# -- rejected --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        pytest.param({"model": "minilm"}, "input", id="missing-input"),
        pytest.param(body(input=3), "input", id="input-int"),
        pytest.param(body(input={"text": "x"}), "input", id="input-dict"),
        pytest.param(body(input=None), "input", id="input-none"),
        pytest.param(body(input=True), "input", id="input-bool"),
        pytest.param(body(input=[]), "input", id="empty-list"),
        pytest.param(body(input=""), "input", id="empty-string"),
        pytest.param(body(input=" \t\n "), "input", id="whitespace-string"),
        pytest.param(body(input=["ok", ""]), "input[1]", id="empty-item"),
        pytest.param(body(input=["ok", "   "]), "input[1]", id="whitespace-item"),
        pytest.param(body(input="\u200b\u200d\ufeff"), "input", id="zero-width-only"),
        pytest.param(body(input=["ok", "\x00\x00"]), "input[1]", id="nul-only-item"),
        pytest.param(body(input=["ok", "\u202e \x7f\u2060"]), "input[1]", id="bidi-control-format-only"),
        pytest.param(body(input=["ok", 5]), "input[1]", id="int-item"),
        pytest.param(body(input=["ok", None]), "input[1]", id="none-item"),
        pytest.param(body(input=["ok", 1.5]), "input[1]", id="float-item"),
        pytest.param(body(input=["ok", True]), "input[1]", id="bool-item"),
        pytest.param(body(input=["ok", {"t": "x"}]), "input[1]", id="dict-item"),
        pytest.param(body(input=[1, 2, 3]), "input[0]", id="token-ids"),
        pytest.param(body(input=[[1, 2], [3]]), "input[0]", id="token-id-arrays"),
        pytest.param(body(input=["x"] * (MAX_ITEMS + 1)), "input", id="too-many-items"),
        pytest.param(body(extra_field=1), "extra_field", id="unknown-field"),
        pytest.param({"input": "x"}, "model", id="missing-model"),
        pytest.param(body(model=1), "model", id="model-int"),
        pytest.param(body(model=None), "model", id="model-none"),
        pytest.param(body(encoding_format=1), "encoding_format", id="encoding-format-int"),
        pytest.param(body(encoding_format="hex"), "encoding_format", id="encoding-format-value"),
        pytest.param(body(encoding_format="FLOAT"), "encoding_format", id="encoding-format-case"),
        pytest.param(body(dimensions="384"), "dimensions", id="dimensions-str"),
        pytest.param(body(dimensions=384.0), "dimensions", id="dimensions-float"),
        pytest.param(body(dimensions=True), "dimensions", id="dimensions-bool"),
        pytest.param(body(user=7), "user", id="user-int"),
    ],
)
def test_bad_request_names_the_field(payload: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_embeddings_request(payload, MAX_ITEMS)
    assert info.value.param == param
    assert info.value.kind is ErrorKind.INVALID_REQUEST
    assert info.value.message


@pytest.mark.parametrize("payload", [None, [], "input", 3, [{"input": "x"}]])
def test_body_must_be_an_object(payload: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_embeddings_request(payload, MAX_ITEMS)
    assert info.value.param is None


def test_token_ids_say_why() -> None:
    with pytest.raises(InvalidRequest, match="token-id"):
        texts_from_input([[101, 2023, 102]], MAX_ITEMS)
    with pytest.raises(InvalidRequest, match="token-id"):
        texts_from_input([101, 2023], MAX_ITEMS)


def test_too_many_items_code() -> None:
    with pytest.raises(InvalidRequest) as info:
        texts_from_input(["a"] * 3, max_items=2)
    assert info.value.code == "too_many_items"
    assert "2" in info.value.message


def test_check_dimensions() -> None:
    check_dimensions(None, 384)
    check_dimensions(384, 384)
    for bad in (128, 385, 0, -1):
        with pytest.raises(InvalidRequest) as info:
            check_dimensions(bad, 384)
        assert info.value.param == "dimensions"


def test_check_body_size() -> None:
    check_body_size(100, 100)
    with pytest.raises(TooLarge) as info:
        check_body_size(101, 100)
    assert info.value.code == "body_too_large"
    assert info.value.kind is ErrorKind.TOO_LARGE
    assert "100" in info.value.message


# -- a text must have something to embed ----------------------------------------------------

_BLANK_CATEGORIES = {"Cc", "Cf", "Zs", "Zl", "Zp"}


def test_has_text_for_every_code_point() -> None:
    """Exhaustive over Unicode: a character counts as text unless it is whitespace, a control or a
    format (invisible) character, exactly as unicodedata classifies it."""
    wrong = [
        hex(c)
        for c in range(sys.maxunicode + 1)
        if has_text(chr(c)) == (unicodedata.category(chr(c)) in _BLANK_CATEGORIES or chr(c).isspace())
    ]
    assert wrong == []


@given(st.text())
def test_has_text_is_any_visible_character(value: str) -> None:
    visible = any(not (unicodedata.category(ch) in _BLANK_CATEGORIES or ch.isspace()) for ch in value)
    assert has_text(value) == visible


@pytest.mark.parametrize("text", ["a", " a ", "\u200ba", "\x00x", "日本", "😀", "\U000f0000"])
def test_text_with_a_visible_character_is_kept_as_sent(text: str) -> None:
    assert texts_from_input([text], MAX_ITEMS) == (text,)


# -- /v1/infer: the same strictness -----------------------------------------------------------


def infer_body(**fields: Any) -> dict[str, Any]:
    return {"model": "minilm", "input": "hello", **fields}


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        pytest.param(infer_body(return_embedding="yes"), "return_embedding", id="bool-as-string"),
        pytest.param(infer_body(return_embedding=1), "return_embedding", id="bool-as-int"),
        pytest.param(infer_body(heads="topics"), "heads", id="heads-string"),
        pytest.param(infer_body(heads=[1]), "heads.0", id="heads-int-item"),
        pytest.param(infer_body(model=1), "model", id="model-int"),
        pytest.param(infer_body(extra=1), "extra", id="unknown-field"),
    ],
)
def test_infer_body_is_strict(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(InferRequest, payload)
    assert info.value.param == param


def test_head_bodies_are_strict() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(CreateHead, {"name": 5, "kind": "classifier", "examples": []})
    assert info.value.param == "name"
    with pytest.raises(InvalidRequest) as info:
        parse(ShareHead, {"clients": "bob"})
    assert info.value.param == "clients"


# -- vector encoding -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.dtype(">f4")])
def test_base64_round_trip(dtype: Any) -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(dtype)
    encoded = format_embedding(vector, "base64")
    assert isinstance(encoded, str)
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert decoded.shape == (384,)
    np.testing.assert_array_equal(decoded, vector.astype(np.float32))


def test_base64_is_little_endian_float32_bytes() -> None:
    assert (
        format_embedding(np.array([1.0], dtype=np.float32), "base64") == base64.b64encode(b"\x00\x00\x80\x3f").decode()
    )


def test_float_encoding_is_a_json_list() -> None:
    vector = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    encoded = format_embedding(vector, "float")
    assert encoded == [0.5, -1.25, 3.0]
    assert all(type(x) is float for x in encoded)

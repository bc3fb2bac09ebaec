"""Parsing and checking uploaded examples and training options."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyray.errors import InvalidRequest
from polyray.heads.examples import (
    MAX_EXAMPLES,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    Example,
    TrainOptions,
    min_examples,
    parse_examples,
    parse_jsonl,
    validation_size,
)
from polyray.heads.kinds import HeadKind

C, M, R, P = HeadKind.CLASSIFIER, HeadKind.MULTILABEL, HeadKind.REGRESSOR, HeadKind.PROJECTION


def records(labels: list[Any]) -> list[dict[str, Any]]:
    return [{"text": f"sentence {i}", "label": label} for i, label in enumerate(labels)]


VALID_LABELS: dict[HeadKind, list[Any]] = {C: ["a", "b"] * 5, M: [["a"], ["b"]] * 5, R: list(range(10))}


def two_classes(n: int = 10) -> list[dict[str, Any]]:
    return records(["a" if i % 2 else "b" for i in range(n)])


@contextmanager
def raises(code: str, param: str | None = None) -> Iterator[pytest.ExceptionInfo[InvalidRequest]]:
    """Expect an InvalidRequest with this ``code`` (and ``param``, when given)."""
    with pytest.raises(InvalidRequest) as info:
        yield info
    assert info.value.code == code, info.value.message
    if param is not None:
        assert info.value.param == param, info.value.message


# --- valid input ------------------------------------------------------------------------------


def test_classifier_labels_strings_and_ints_become_strings() -> None:
    got = parse_examples(C, records([1, "1", 2, "2", "x", "x", 1, 2, "x", 2]))
    assert [e.label for e in got[:3]] == ["1", "1", "2"]
    assert got[0] == Example("sentence 0", "1")


def test_text_is_kept_as_given() -> None:
    recs = two_classes()
    recs[0]["text"] = "  padded \n"
    assert parse_examples(C, recs)[0].text == "  padded \n"


def test_multilabel_lists_are_sorted_and_deduplicated() -> None:
    labels: list[Any] = [["b", "a", "b"], [], "a", [3], ["b"], ["a"], [], ["a", "b"], ["b"], ["a"]]
    got = parse_examples(M, records(labels))
    assert [e.label for e in got[:4]] == [("a", "b"), (), ("a",), ("3",)]


def test_regressor_labels_are_floats() -> None:
    got = parse_examples(R, records([1, 2.5, -3, 0, 1e10, 5, 6, 7, 8, 9]))
    assert [e.label for e in got[:3]] == [1.0, 2.5, -3.0]
    assert all(isinstance(e.label, float) for e in got)


def test_projection_ignores_labels_and_may_omit_them() -> None:
    recs: list[dict[str, Any]] = [{"text": f"t{i}"} for i in range(9)] + [{"text": "x", "label": [1, {}]}]
    got = parse_examples(P, recs, TrainOptions(dimensions=2))
    assert {e.label for e in got} == {None}


# --- bad records ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "param"),
    [
        ("just text", "examples[3]"),
        (["text", "a"], "examples[3]"),
        (None, "examples[3]"),
        ({"label": "a"}, "examples[3].text"),
        ({"text": "", "label": "a"}, "examples[3].text"),
        ({"text": " \t\n", "label": "a"}, "examples[3].text"),
        ({"text": 12, "label": "a"}, "examples[3].text"),
        ({"text": "ok", "label": "a", "weight": 2}, "examples[3].weight"),
    ],
)
def test_malformed_records_are_invalid_examples(record: object, param: str) -> None:
    recs: list[object] = list(two_classes())
    recs[3] = record
    with raises("invalid_example", param):
        parse_examples(C, recs)


@pytest.mark.parametrize(
    ("kind", "label"),
    [
        (C, ["a"]),
        (C, 1.5),
        (C, True),
        (C, None),
        (C, ""),
        (C, "  "),
        (C, "x" * (MAX_LABEL_CHARS + 1)),
        (C, {"a": 1}),
        (M, [["a"]]),
        (M, ["a", None]),
        (M, [True]),
        (M, None),
        (M, [""]),
        (R, "3.5"),
        (R, None),
        (R, True),
        (R, [1.0]),
        (R, math.nan),
        (R, math.inf),
        (R, -math.inf),
        (R, 10**400),
    ],
)
def test_wrong_label_types_are_invalid_labels(kind: HeadKind, label: object) -> None:
    recs = records(VALID_LABELS[kind])
    recs[4]["label"] = label
    with raises("invalid_label", "examples[4].label"):
        parse_examples(kind, recs)


@pytest.mark.parametrize("kind", [C, M, R])
def test_missing_label_is_an_invalid_label(kind: HeadKind) -> None:
    recs = records(list(range(10)))
    del recs[7]["label"]
    with raises("invalid_label", "examples[7].label"):
        parse_examples(kind, recs)


# --- the set as a whole -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [C, M, R])
def test_fewer_than_ten_examples(kind: HeadKind) -> None:
    labels = VALID_LABELS[kind]
    with raises("too_few_examples", "examples"):
        parse_examples(kind, records(labels[:9]))
    assert len(parse_examples(kind, records(labels))) == 10


def test_no_examples_at_all() -> None:
    with raises("too_few_examples", "examples"):
        parse_examples(C, [])


def test_classifier_needs_two_examples_per_label() -> None:
    labels = ["a"] * 5 + ["b"] * 4 + ["c"]
    with raises("too_few_examples", "examples") as info:
        parse_examples(C, records(labels))
    assert "'c'" in info.value.message
    assert len(parse_examples(C, records(["a"] * 5 + ["b"] * 3 + ["c"] * 2))) == 10


def test_multilabel_has_no_per_label_minimum() -> None:
    labels: list[Any] = [["a"]] * 9 + [["b"]]
    assert len(parse_examples(M, records(labels))) == 10


@pytest.mark.parametrize(
    ("kind", "labels"),
    [(C, ["a"] * 12), (C, [7] * 12), (M, [["a"]] * 12), (M, [[]] * 12), (M, [[], ["a"]] * 6)],
)
def test_fewer_than_two_distinct_labels(kind: HeadKind, labels: list[Any]) -> None:
    with raises("too_few_labels", "examples"):
        parse_examples(kind, records(labels))


def test_too_many_distinct_labels() -> None:
    labels = [f"l{i // 2}" for i in range(2 * (MAX_LABELS + 1))]
    with raises("too_many_labels", "examples"):
        parse_examples(C, records(labels))


def test_too_many_examples_is_refused_before_parsing() -> None:
    recs: list[object] = [None] * (MAX_EXAMPLES + 1)  # would be invalid_example if parsed
    with raises("too_many_examples", "examples"):
        parse_examples(C, recs)


def test_projection_minimum_grows_with_dimensions_and_leaves_enough_to_train() -> None:
    assert min_examples(P, TrainOptions(dimensions=2)) == 10
    for dims in (5, 9, 10, 40, 200):
        for fraction in (0.05, 0.2, 0.45):
            options = TrainOptions(dimensions=dims, validation_fraction=fraction)
            n = min_examples(P, options)
            assert n >= max(10, dims + 1)
            assert n - validation_size(n, fraction) >= dims + 1  # enough rows to fit d components
            assert (n - 1) - validation_size(n - 1, fraction) < dims + 1 or n - 1 < max(10, dims + 1)
    options = TrainOptions(dimensions=20)
    n = min_examples(P, options)
    with raises("too_few_examples", "examples"):
        parse_examples(P, [{"text": "t"}] * (n - 1), options)
    assert len(parse_examples(P, [{"text": "t"}] * n, options)) == n


def test_other_kinds_need_ten() -> None:
    assert {min_examples(kind) for kind in (C, M, R)} == {10}


@given(st.integers(1, 100_000), st.floats(0.01, 0.49), st.integers(0, 50))
def test_validation_size_is_at_least_two_and_one_per_class(n: int, fraction: float, classes: int) -> None:
    size = validation_size(n, fraction, num_classes=classes)
    assert size >= max(2, classes, math.ceil(fraction * n))


# --- JSON lines -------------------------------------------------------------------------------


def test_parse_jsonl_skips_blank_lines_and_handles_crlf() -> None:
    text = '{"text": "a", "label": "x"}\r\n\n   \n{"text": "b", "label": 1}\n'
    assert parse_jsonl(text) == [{"text": "a", "label": "x"}, {"text": "b", "label": 1}]


def test_parse_jsonl_keeps_unicode_line_separators_inside_strings() -> None:
    text = json.dumps({"text": "one\u2028two\u0085three", "label": "x"}, ensure_ascii=False)
    assert parse_jsonl(text) == [{"text": "one\u2028two\u0085three", "label": "x"}]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('{"text": "a"}\n{"text": \n', 2),
        ('\n\n{"text": "a"}\n\nnot json\n', 5),
        ('{"text": "a"}\n["a", "b"]\n', 2),
        ('{"text": "a"}\n"just a string"\n', 2),
        ('{"text": "a", "label": NaN}\n', 1),
        ('{"text": "a", "label": Infinity}\n', 1),
    ],
)
def test_parse_jsonl_names_the_bad_line(text: str, line: int) -> None:
    with raises("invalid_jsonl", "examples") as info:
        parse_jsonl(text)
    assert info.value.message.startswith(f"line {line}:")


def test_parse_jsonl_stops_past_the_maximum() -> None:
    text = '{"text": "a"}\n' * (MAX_EXAMPLES + 5)
    with raises("too_many_examples", "examples"):
        parse_jsonl(text)


def test_jsonl_to_examples() -> None:
    lines = [json.dumps({"text": f"t{i}", "label": i * 0.5}) for i in range(10)]
    examples = parse_examples(R, parse_jsonl("\n".join(lines)))
    assert examples[3] == Example("t3", 1.5)


# --- options ----------------------------------------------------------------------------------


def test_default_options() -> None:
    options = TrainOptions.from_mapping(C, None)
    assert options == TrainOptions()
    assert options.as_dict() == {"validation_fraction": 0.2, "threshold": 0.5, "seed": 0, "regularization": 1.0}


def test_options_round_trip_through_as_dict() -> None:
    options = TrainOptions.from_mapping(
        P, {"dimensions": 16, "validation_fraction": 0.3, "seed": 7, "regularization": 2}, dim_in=384
    )
    assert options == TrainOptions(validation_fraction=0.3, dimensions=16, seed=7, regularization=2.0)
    assert TrainOptions.from_mapping(P, options.as_dict(), dim_in=384) == options
    multi = TrainOptions.from_mapping(M, {"threshold": 0.3})
    assert TrainOptions.from_mapping(M, multi.as_dict()) == multi
    assert multi.as_dict()["threshold"] == 0.3


@pytest.mark.parametrize(
    ("kind", "mapping", "param"),
    [
        (C, {"learning_rate": 0.1}, "options.learning_rate"),
        (C, {"validation_fraction": 0}, "options.validation_fraction"),
        (C, {"validation_fraction": 0.5}, "options.validation_fraction"),
        (C, {"validation_fraction": -0.1}, "options.validation_fraction"),
        (C, {"validation_fraction": "0.2"}, "options.validation_fraction"),
        (C, {"validation_fraction": True}, "options.validation_fraction"),
        (C, {"validation_fraction": math.nan}, "options.validation_fraction"),
        (M, {"threshold": 0}, "options.threshold"),
        (M, {"threshold": 1}, "options.threshold"),
        (M, {"threshold": None}, "options.threshold"),
        (C, {"regularization": 0}, "options.regularization"),
        (R, {"regularization": -1}, "options.regularization"),
        (R, {"regularization": math.inf}, "options.regularization"),
        (C, {"seed": 1.5}, "options.seed"),
        (C, {"seed": -1}, "options.seed"),
        (C, {"seed": 2**32}, "options.seed"),
        (C, {"seed": False}, "options.seed"),
        (C, {"dimensions": 8}, "options.dimensions"),
        (R, {"dimensions": 8}, "options.dimensions"),
        (P, {}, "options.dimensions"),
        (P, {"dimensions": 0}, "options.dimensions"),
        (P, {"dimensions": 2.0}, "options.dimensions"),
        (P, {"dimensions": True}, "options.dimensions"),
        (P, {"dimensions": 384}, "options.dimensions"),
    ],
)
def test_bad_options(kind: HeadKind, mapping: dict[str, object], param: str) -> None:
    with raises("invalid_option", param):
        TrainOptions.from_mapping(kind, mapping, dim_in=384)


@pytest.mark.parametrize("mapping", [[("seed", 1)], "seed=1", 3])
def test_options_must_be_a_mapping(mapping: object) -> None:
    with raises("invalid_option", "options"):
        TrainOptions.from_mapping(C, mapping)  # type: ignore[arg-type]


def test_dimensions_bound_needs_dim_in() -> None:
    assert TrainOptions.from_mapping(P, {"dimensions": 1000}).dimensions == 1000
    assert TrainOptions.from_mapping(P, {"dimensions": 383}, dim_in=384).dimensions == 383

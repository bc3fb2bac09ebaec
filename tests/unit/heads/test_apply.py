"""Stacked application of many heads: one matrix product, same answers as each head alone."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from heads_support import (
    DIM,
    REF,
    assert_outputs_close,
    clusters,
    make_spec,
    random_head,
    random_params,
    reference_output,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from polyray.heads.apply import HeadStack
from polyray.heads.examples import Example, TrainOptions
from polyray.heads.kinds import HeadKind, HeadParams, HeadSpec
from polyray.heads.train import train_head
from polyray.types import ModelRef

C, M, R, P = HeadKind.CLASSIFIER, HeadKind.MULTILABEL, HeadKind.REGRESSOR, HeadKind.PROJECTION


def mixed_heads(
    seed: int = 0, kinds: tuple[HeadKind, ...] = (P, C, R, M, C, M, P, R, C)
) -> list[tuple[HeadSpec, HeadParams]]:
    rng = np.random.default_rng(seed)
    return [random_head(rng, kind, i) for i, kind in enumerate(kinds)]


def embeddings(n: int, seed: int = 1) -> np.ndarray:
    x, _ = clusters([n], seed=seed)
    return x


def test_stack_concatenates_every_head_once() -> None:
    heads = mixed_heads()
    stack = HeadStack(heads)
    assert len(stack) == len(heads)
    assert stack.dim_in == DIM and stack.model == REF
    assert stack.dim_out == sum(params.dim_out for _, params in heads)
    assert stack.specs == tuple(spec for spec, _ in heads)


def test_mixed_kinds_stacked_equal_each_head_alone() -> None:
    heads = mixed_heads()
    x = embeddings(7)
    stacked = HeadStack(heads).apply(x)
    assert len(stacked) == 7 and all(len(row) == len(heads) for row in stacked)
    for i, (spec, params) in enumerate(heads):
        alone = HeadStack([(spec, params)]).apply(x)
        for r in range(len(x)):
            assert_outputs_close(stacked[r][i], alone[r][0], atol=1e-6)
            assert_outputs_close(stacked[r][i], reference_output(spec, params, x[r]))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from(list(HeadKind)), min_size=1, max_size=12),
    st.integers(1, 9),
    st.integers(0, 2**16),
)
def test_any_head_set_stacked_equals_reference(kinds: list[HeadKind], num_rows: int, seed: int) -> None:
    heads = mixed_heads(seed, tuple(kinds))
    x = embeddings(num_rows, seed=seed + 1)
    stacked = HeadStack(heads).apply(x)
    for r in range(num_rows):
        for i, (spec, params) in enumerate(heads):
            assert_outputs_close(stacked[r][i], reference_output(spec, params, x[r]))


def test_output_shapes_per_kind_and_json_ready() -> None:
    heads = mixed_heads(kinds=(C, M, R, P))
    outputs = HeadStack(heads).apply(embeddings(2))
    classifier, multilabel, regressor, projection = outputs[0]
    assert set(classifier) == {"label", "scores"} and classifier["label"] in heads[0][0].labels
    assert list(classifier["scores"]) == list(heads[0][0].labels)
    assert sum(classifier["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert classifier["label"] == max(classifier["scores"], key=classifier["scores"].get)
    assert set(multilabel) == {"labels", "scores"} and set(multilabel["labels"]) <= set(multilabel["scores"])
    assert isinstance(regressor["value"], float)
    assert len(projection["embedding"]) == heads[3][1].dim_out
    assert json.loads(json.dumps(outputs)) == outputs  # plain Python data, exactly representable


def test_multilabel_uses_each_heads_threshold() -> None:
    params = HeadParams(np.zeros((3, DIM), dtype=np.float32), np.array([-1.0, 0.0, 1.0], dtype=np.float32))
    scores = [1 / (1 + np.exp(1.0)), 0.5, 1 / (1 + np.exp(-1.0))]  # 0.269, 0.5, 0.731
    labels = ("x", "y", "z")
    strict = make_spec(M, params, name="strict", labels=labels, threshold=0.7)
    loose = make_spec(M, params, name="loose", labels=labels, threshold=0.25)
    middle = make_spec(M, params, name="middle", labels=labels, threshold=0.5)  # at the threshold counts
    rows = HeadStack([(strict, params), (loose, params), (middle, params)]).apply(embeddings(1))
    assert [out["labels"] for out in rows[0]] == [["z"], ["x", "y", "z"], ["y", "z"]]
    np.testing.assert_allclose(list(rows[0][0]["scores"].values()), scores, rtol=1e-6)


def test_classifier_ties_go_to_the_first_label() -> None:
    params = HeadParams(np.zeros((3, DIM), dtype=np.float32), np.array([0.0, 2.0, 2.0], dtype=np.float32))
    other = HeadParams(np.zeros((2, DIM), dtype=np.float32), np.array([5.0, 5.0], dtype=np.float32))
    stack = HeadStack(
        [
            (make_spec(C, other, name="o", labels=("p", "q")), other),
            (make_spec(C, params, labels=("a", "b", "c")), params),
        ]
    )
    first, second = stack.apply(embeddings(2))[1]
    assert first["label"] == "p" and second["label"] == "b"
    assert second["scores"]["b"] == second["scores"]["c"]


def test_extreme_logits_do_not_overflow() -> None:
    weight = np.zeros((2, DIM), dtype=np.float32)
    params = HeadParams(weight, np.array([1e4, -1e4], dtype=np.float32))
    stack = HeadStack(
        [(make_spec(C, params, labels=("a", "b")), params), (make_spec(M, params, labels=("a", "b")), params)]
    )
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        classifier, multilabel = stack.apply(embeddings(1))[0]
    assert classifier["scores"] == {"a": 1.0, "b": 0.0}
    assert multilabel == {"labels": ["a"], "scores": {"a": 1.0, "b": 0.0}}


def test_trained_classifier_applied_by_the_stack_predicts_like_training() -> None:
    x, y = clusters([25, 25, 25], spread=1.5, seed=8)
    examples = [Example(f"t{i}", "abc"[label]) for i, label in enumerate(y)]
    head = train_head(C, x, examples, TrainOptions())
    spec = make_spec(C, head.params, labels=head.labels)
    outputs = HeadStack([(spec, head.params)]).apply(x)
    predicted = [row[0]["label"] for row in outputs]
    accuracy = np.mean([p == e.label for p, e in zip(predicted, examples, strict=True)])
    assert accuracy > 0.9


def test_compute_is_column_oriented() -> None:
    heads = mixed_heads(kinds=(C, C, M, R, P))
    out = HeadStack(heads).compute(embeddings(4))
    assert out.class_probs.shape == (4, heads[0][1].dim_out + heads[1][1].dim_out)
    assert out.class_top.shape == (4, 2)
    assert out.multi_scores.shape == out.multi_on.shape == (4, heads[2][1].dim_out)
    assert out.values.shape == (4, 1) and out.projections.shape == (4, heads[4][1].dim_out)


def test_a_stack_of_one_kind_only() -> None:
    heads = mixed_heads(kinds=(R, R, R))
    rows = HeadStack(heads).apply(embeddings(3))
    for r, row in enumerate(rows):
        for i, (spec, params) in enumerate(heads):
            assert_outputs_close(row[i], reference_output(spec, params, embeddings(3)[r]))


def test_zero_rows() -> None:
    assert HeadStack(mixed_heads()).apply(np.zeros((0, DIM), dtype=np.float32)) == []


# --- refused stacks and inputs ----------------------------------------------------------------


def test_heads_of_different_model_versions_cannot_stack() -> None:
    (spec, params), (other, other_params) = mixed_heads(kinds=(C, R))
    with pytest.raises(ValueError, match="one model version"):
        HeadStack([(spec, params), (replace(other, model=ModelRef("minilm", "2")), other_params)])


def test_heads_of_different_input_sizes_cannot_stack() -> None:
    rng = np.random.default_rng(0)
    small = random_params(rng, 1, DIM - 1)
    with pytest.raises(ValueError, match="dimensions"):
        HeadStack([mixed_heads(kinds=(R,))[0], (make_spec(R, small), small)])


def test_empty_stack_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one head"):
        HeadStack([])


@pytest.mark.parametrize(
    ("kind", "dim_out", "labels"),
    [(C, 3, ("a", "b")), (C, 1, ("a",)), (M, 2, ("a",)), (M, 0, ()), (R, 2, ())],
)
def test_spec_and_params_must_agree(kind: HeadKind, dim_out: int, labels: tuple[str, ...]) -> None:
    params = HeadParams(np.zeros((dim_out, DIM), dtype=np.float32), np.zeros(dim_out, dtype=np.float32))
    with pytest.raises(ValueError):
        HeadStack([(make_spec(kind, params, labels=labels), params)])


def test_spec_dimensions_must_match_params() -> None:
    spec, params = mixed_heads(kinds=(R,))[0]
    with pytest.raises(ValueError, match="spec says"):
        HeadStack([(replace(spec, dim_in=DIM + 1), params)])


@pytest.mark.parametrize("shape", [(DIM,), (2, DIM + 1), (2, DIM, 1)])
def test_embeddings_of_the_wrong_shape_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        HeadStack(mixed_heads()).apply(np.zeros(shape, dtype=np.float32))


def test_float64_embeddings_are_accepted() -> None:
    heads = mixed_heads()
    x = embeddings(3)
    want = HeadStack(heads).apply(x)
    got = HeadStack(heads).apply(x.astype(np.float64))
    assert got == want

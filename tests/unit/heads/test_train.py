"""Fitting heads: exported parameters reproduce sklearn, metrics describe the stored head."""

from __future__ import annotations

import numpy as np
import pytest
from heads_support import DIM, class_examples, clusters, unit_rows
from sklearn.decomposition import PCA  # type: ignore[import-untyped]
from sklearn.linear_model import LogisticRegression, Ridge  # type: ignore[import-untyped]

from polyray.errors import InvalidRequest
from polyray.heads.examples import Example, TrainOptions
from polyray.heads.kinds import HeadKind
from polyray.heads.train import CONSTANT_LOGIT, TrainedHead, sigmoid, split_indices, train_head

C, M, R, P = HeadKind.CLASSIFIER, HeadKind.MULTILABEL, HeadKind.REGRESSOR, HeadKind.PROJECTION


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    probabilities: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return probabilities


def logits(head: TrainedHead, x: np.ndarray) -> np.ndarray:
    z: np.ndarray = x.astype(np.float64) @ head.params.weight.T.astype(np.float64) + head.params.bias
    return z


# --- classifier -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_classifier_softmax_equals_sklearn_predict_proba(num_classes: int) -> None:
    x, y = clusters([30] * num_classes, spread=1.5, seed=num_classes)
    names = [f"class-{k}" for k in range(num_classes)]
    examples = class_examples(y, names)
    options = TrainOptions(regularization=0.7, seed=3)
    head = train_head(C, x, examples, options)
    train, _ = split_indices(C, examples, options)
    reference = LogisticRegression(C=0.7, max_iter=1000).fit(x[train].astype(np.float64), np.array(names)[y[train]])
    assert head.labels == tuple(reference.classes_) == tuple(sorted(names))
    assert head.params.weight.shape == (num_classes, DIM)
    assert head.params.weight.dtype == head.params.bias.dtype == np.float32
    np.testing.assert_allclose(softmax(logits(head, x)), reference.predict_proba(x.astype(np.float64)), atol=2e-5)


def test_classifier_metrics_on_separable_clusters() -> None:
    x, y = clusters([40, 25, 15], spread=0.3)
    head = train_head(C, x, class_examples(y, ["a", "b", "c"]), TrainOptions())
    assert head.metrics.keys() == {"accuracy", "macro_f1", "baseline_accuracy"}
    assert head.metrics["accuracy"] == 1.0
    assert head.metrics["macro_f1"] == 1.0
    assert head.metrics["baseline_accuracy"] == pytest.approx(0.5)  # stratified: 8 of 16 are "a"
    assert (head.num_train, head.num_validation) == (64, 16)


def test_classifier_metrics_match_the_stored_params() -> None:
    """Noisy classes: the reported accuracy is exactly that of the exported parameters."""
    x, y = clusters([30, 30, 30], spread=4.0, seed=5)
    examples = class_examples(y, ["a", "b", "c"])
    options = TrainOptions(seed=1)
    head = train_head(C, x, examples, options)
    _, val = split_indices(C, examples, options)
    predicted = np.argmax(logits(head, x[val]), axis=1)
    assert head.metrics["accuracy"] == pytest.approx(float(np.mean(predicted == y[val])))
    assert 0.0 < head.metrics["accuracy"] < 1.0


def test_classifier_labels_are_sorted_strings() -> None:
    x, y = clusters([10, 10, 10])
    head = train_head(C, x, class_examples(y, ["zebra", "10", "9"]), TrainOptions())
    assert head.labels == ("10", "9", "zebra")


def test_stratified_split_keeps_every_class_in_both_parts() -> None:
    """Ten examples, five classes of two: each class must be trained on and checked."""
    y = np.repeat(np.arange(5), 2)
    examples = class_examples(y, list("abcde"))
    for seed in range(20):
        options = TrainOptions(seed=seed)
        train, val = split_indices(C, examples, options)
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(10))
        assert set(y[train]) == set(y[val]) == set(range(5))
    x, _ = clusters([2] * 5)
    head = train_head(C, x, examples, TrainOptions())
    assert head.labels == tuple("abcde") and head.num_validation == 5


def test_uneven_classes_are_all_trained_on() -> None:
    counts = [2, 2, 2, 3, 3, 3, 2, 2, 2, 3, 3]  # odd total: stratified rounding may starve a class
    y = np.repeat(np.arange(len(counts)), counts)
    examples = class_examples(y, [f"l{k:02d}" for k in range(len(counts))])
    for seed in range(30):
        options = TrainOptions(seed=seed, validation_fraction=0.45)
        train, val = split_indices(C, examples, options)
        assert set(y[train]) == set(range(len(counts)))
        assert len(set(train.tolist()) & set(val.tolist())) == 0
        assert len(train) + len(val) == len(y)


# --- multilabel -------------------------------------------------------------------------------


def multilabel_data(seed: int = 0) -> tuple[np.ndarray, list[Example], np.ndarray]:
    """Three labels driven by three coordinates of the embedding (a label is on where its coordinate > 0)."""
    rng = np.random.default_rng(seed)
    x = unit_rows(rng.normal(size=(150, DIM)))
    truth = x[:, :3] > 0.0
    names = ("red", "green", "blue")
    examples = [
        Example(f"t{i}", tuple(sorted(n for n, on in zip(names, row, strict=True) if on)))
        for i, row in enumerate(truth)
    ]
    return x, examples, truth


def test_multilabel_rows_equal_sklearn_binary_regressions() -> None:
    x, examples, truth = multilabel_data()
    options = TrainOptions(regularization=10.0)
    head = train_head(M, x, examples, options)
    assert head.labels == ("blue", "green", "red")
    train, _ = split_indices(M, examples, options)
    for row, column in zip(range(3), (2, 1, 0), strict=True):
        reference = LogisticRegression(C=10.0, max_iter=1000).fit(x[train].astype(np.float64), truth[train, column])
        want = reference.predict_proba(x.astype(np.float64))[:, 1]
        np.testing.assert_allclose(sigmoid(logits(head, x)[:, row]), want, atol=2e-5)
    assert head.metrics.keys() == {"micro_f1", "macro_f1", "subset_accuracy"}
    assert head.metrics["micro_f1"] > 0.8


def test_multilabel_threshold_decides_the_metrics() -> None:
    x, examples, truth = multilabel_data(seed=1)
    low = train_head(M, x, examples, TrainOptions(threshold=0.05))
    high = train_head(M, x, examples, TrainOptions(threshold=0.95))
    same = train_head(M, x, examples, TrainOptions(threshold=0.5))
    np.testing.assert_array_equal(low.params.weight, high.params.weight)  # the threshold is not a fit parameter
    _, val = split_indices(M, examples, TrainOptions())
    scores = sigmoid(logits(same, x[val]))
    order = [2, 1, 0]  # head label order blue, green, red -> truth columns
    for head, threshold in ((low, 0.05), (high, 0.95), (same, 0.5)):
        predicted = scores >= threshold
        exact = float(np.mean(np.all(predicted == truth[val][:, order], axis=1)))
        assert head.metrics["subset_accuracy"] == pytest.approx(exact)
    assert same.metrics["subset_accuracy"] > max(low.metrics["subset_accuracy"], high.metrics["subset_accuracy"])


def test_multilabel_constant_labels_get_constant_outputs() -> None:
    """'always' is on for every example, 'rare' only for one that lands in validation: neither can be fitted."""
    x, y = clusters([20, 20], spread=0.3)
    base = [("always", "odd") if label else ("always",) for label in y]
    options = TrainOptions(seed=0)
    probe = [Example(f"t{i}", labels) for i, labels in enumerate(base)]
    _, val = split_indices(M, probe, options)
    rare_row = int(val[0])
    examples = [Example(e.text, (*e.label, "rare") if i == rare_row else e.label) for i, e in enumerate(probe)]  # type: ignore[misc]
    head = train_head(M, x, examples, options)
    assert head.labels == ("always", "odd", "rare")
    always, odd, rare = range(3)
    assert not head.params.weight[always].any() and head.params.bias[always] == CONSTANT_LOGIT
    assert not head.params.weight[rare].any() and head.params.bias[rare] == -CONSTANT_LOGIT
    assert head.params.weight[odd].any()
    scores = sigmoid(logits(head, x))
    assert np.all(scores[:, always] > 0.999) and np.all(scores[:, rare] < 0.001)


def test_multilabel_examples_with_no_labels() -> None:
    x, y = clusters([20, 20], spread=0.3)
    examples = [Example(f"t{i}", ("a", "b") if label else ()) for i, label in enumerate(y)]
    head = train_head(M, x, examples, TrainOptions())
    assert head.metrics["subset_accuracy"] == 1.0


# --- regressor --------------------------------------------------------------------------------


def test_regressor_recovers_a_linear_target() -> None:
    rng = np.random.default_rng(4)
    x = unit_rows(rng.normal(size=(300, DIM)))
    direction = rng.normal(size=DIM)
    target = 5.0 * x.astype(np.float64) @ direction + 2.0 + 0.05 * rng.normal(size=300)
    examples = [Example(f"t{i}", float(v)) for i, v in enumerate(target)]
    options = TrainOptions(regularization=0.01)
    head = train_head(R, x, examples, options)
    assert head.params.weight.shape == (1, DIM) and head.labels == ()
    assert head.metrics.keys() == {"r2", "mae", "rmse", "baseline_mae"}
    assert head.metrics["r2"] > 0.9
    assert head.metrics["mae"] < head.metrics["baseline_mae"] / 5
    assert head.metrics["mae"] <= head.metrics["rmse"]
    train, val = split_indices(R, examples, options)
    reference = Ridge(alpha=0.01).fit(x[train].astype(np.float64), target[train])
    np.testing.assert_allclose(logits(head, x)[:, 0], reference.predict(x.astype(np.float64)), rtol=1e-4, atol=1e-4)
    predicted = logits(head, x[val])[:, 0]
    assert head.metrics["mae"] == pytest.approx(float(np.mean(np.abs(predicted - target[val]))), rel=1e-4)


# --- projection -------------------------------------------------------------------------------


def test_projection_equals_sklearn_pca_transform() -> None:
    rng = np.random.default_rng(2)
    basis = rng.normal(size=(6, DIM))
    x = unit_rows(rng.normal(size=(120, 6)) @ basis + 0.05 * rng.normal(size=(120, DIM)))
    examples = [Example(f"t{i}", None) for i in range(120)]
    options = TrainOptions(dimensions=6, seed=9)
    head = train_head(P, x, examples, options)
    assert head.params.weight.shape == (6, DIM) and head.labels == ()
    train, _ = split_indices(P, examples, options)
    reference = PCA(n_components=6, random_state=9).fit(x[train].astype(np.float64))
    np.testing.assert_allclose(logits(head, x), reference.transform(x.astype(np.float64)), atol=2e-5)
    assert 0.95 < head.metrics["explained_variance"] <= 1.0
    assert 0.95 < head.metrics["train_explained_variance"] <= 1.0


def test_projection_explained_variance_is_low_for_isotropic_noise() -> None:
    rng = np.random.default_rng(3)
    x = unit_rows(rng.normal(size=(200, DIM)))
    head = train_head(P, x, [Example("t", None)] * 200, TrainOptions(dimensions=2))
    assert head.metrics["explained_variance"] < 0.15


def test_projection_dimensions_must_be_below_the_input_and_trainable() -> None:
    x, _ = clusters([30])
    examples = [Example("t", None)] * 30
    for dims in (None, 0, DIM, DIM + 1):
        with pytest.raises(InvalidRequest) as info:
            train_head(P, x, examples, TrainOptions(dimensions=dims))
        assert (info.value.code, info.value.param) == ("invalid_option", "options.dimensions")
    with pytest.raises(InvalidRequest) as info:
        train_head(P, x, examples, TrainOptions(dimensions=24))  # 30 - 6 validation = 24 rows: not > 24
    assert info.value.code == "too_few_examples"
    assert train_head(P, x, examples, TrainOptions(dimensions=23)).params.dim_out == 23


# --- all kinds --------------------------------------------------------------------------------


def any_head(kind: HeadKind, seed: int = 0, options: TrainOptions | None = None) -> TrainedHead:
    x, y = clusters([20, 20, 20], spread=1.0, seed=seed)
    examples = {
        C: class_examples(y, ["a", "b", "c"]),
        M: [Example("t", ("a",) if label else ("b", "c")) for label in y],
        R: [Example("t", float(label)) for label in y],
        P: [Example("t", None) for _ in y],
    }[kind]
    return train_head(kind, x, examples, options or TrainOptions(dimensions=4 if kind is P else None))


@pytest.mark.parametrize("kind", list(HeadKind))
def test_training_is_deterministic_for_a_seed(kind: HeadKind) -> None:
    one, two = any_head(kind), any_head(kind)
    assert one.params.weight.tobytes() == two.params.weight.tobytes()
    assert one.params.bias.tobytes() == two.params.bias.tobytes()
    assert one.metrics == two.metrics and one.labels == two.labels


@pytest.mark.parametrize("kind", list(HeadKind))
def test_the_seed_chooses_the_split(kind: HeadKind) -> None:
    examples = [Example("t", "a" if i % 2 else "b") for i in range(40)]
    one = split_indices(kind, examples, TrainOptions(seed=1))
    two = split_indices(kind, examples, TrainOptions(seed=2))
    assert not np.array_equal(one[1], two[1])


@pytest.mark.parametrize("kind", list(HeadKind))
def test_progress_rises_from_zero_to_one(kind: HeadKind) -> None:
    seen: list[float] = []
    x, y = clusters([20, 20, 20])
    examples = {
        C: class_examples(y, ["a", "b", "c"]),
        M: [Example("t", ("a",) if label else ("b", "c")) for label in y],
        R: [Example("t", float(label)) for label in y],
        P: [Example("t", None) for _ in y],
    }[kind]
    train_head(kind, x, examples, TrainOptions(dimensions=3 if kind is P else None), seen.append)
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert seen == sorted(seen) and all(0.0 <= f <= 1.0 for f in seen)
    assert len(seen) >= 3


@pytest.mark.parametrize("kind", list(HeadKind))
def test_split_sizes_follow_the_validation_fraction(kind: HeadKind) -> None:
    head = any_head(kind, options=TrainOptions(validation_fraction=0.25, dimensions=4 if kind is P else None))
    assert (head.num_train, head.num_validation) == (45, 15)
    assert all(np.isfinite(list(head.metrics.values())))


def test_embeddings_must_match_the_examples() -> None:
    x, y = clusters([10, 10])
    examples = class_examples(y, ["a", "b"])
    with pytest.raises(ValueError, match="do not match"):
        train_head(C, x[:-1], examples, TrainOptions())
    with pytest.raises(ValueError, match="do not match"):
        train_head(C, x[0], examples, TrainOptions())
    bad = x.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        train_head(C, bad, examples, TrainOptions())

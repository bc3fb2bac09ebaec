"""Fit a head on embedded examples and measure it on a held-out split.

The examples are split once (``split_indices``, seeded); the head is fitted on the training part
and exported as the ``HeadParams`` it will be served with, and the validation metrics are
computed from those exported float32 parameters, so the figures describe exactly the stored head.

Per kind: a multinomial ``LogisticRegression`` (classifier), one binary ``LogisticRegression``
per label (multilabel), ``Ridge`` (regressor), ``PCA`` (projection). Each is an affine map of
the embedding, which is what lets ``heads.apply`` run many heads as one matrix product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import f1_score, mean_absolute_error, mean_squared_error, r2_score
from sklearn.model_selection import train_test_split

from polyray.errors import InvalidRequest
from polyray.heads.examples import Example, TrainOptions, labels_of, validation_size
from polyray.heads.kinds import HeadKind, HeadParams

CONSTANT_LOGIT = 10.0  # a multilabel label that is always (never) on: sigmoid(±10) = 0.99995 (0.00005)
MAX_ITER = 1000

Progress = Callable[[float], None]


@dataclass(frozen=True)
class TrainedHead:
    """A fitted head: its parameters, label order, validation metrics and split sizes."""

    params: HeadParams
    labels: tuple[str, ...]
    metrics: dict[str, float]
    num_train: int
    num_validation: int


def train_head(
    kind: HeadKind,
    embeddings: np.ndarray,
    examples: Sequence[Example],
    options: TrainOptions,
    on_progress: Progress | None = None,
) -> TrainedHead:
    """Fit a ``kind`` head on ``embeddings`` (float32, one row per example, same order).

    ``on_progress`` receives increasing fractions in [0, 1], from 0.0 at the start to 1.0 at the end.
    """
    report = on_progress or _no_progress
    report(0.0)
    x = _check_embeddings(embeddings, len(examples))
    if kind is HeadKind.PROJECTION:
        _check_projection_size(x, options)
    train_idx, val_idx = split_indices(kind, examples, options)
    report(0.1)
    fit = _FITTERS[kind]
    params, labels, metrics = fit(x, examples, train_idx, val_idx, options, report)
    report(1.0)
    return TrainedHead(params, labels, metrics, len(train_idx), len(val_idx))


def split_indices(kind: HeadKind, examples: Sequence[Example], options: TrainOptions) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation row indices: seeded, stratified by label for a classifier.

    A classifier's validation part holds at least one example per class (sklearn's stratified
    split requires it); if the stratified rounding leaves a class out of the training part, one of
    its validation examples moves over, so the model knows every label.
    """
    n = len(examples)
    indices = np.arange(n)
    if kind is HeadKind.CLASSIFIER:
        y = np.array([str(e.label) for e in examples])
        classes = np.unique(y)
        size = validation_size(n, options.validation_fraction, num_classes=len(classes))
        train, val = train_test_split(indices, test_size=size, random_state=options.seed, stratify=y)
        missing = np.setdiff1d(classes, y[train])
        for label in missing:
            move = val[np.flatnonzero(y[val] == label)[0]]
            train, val = np.append(train, move), val[val != move]
    else:
        size = validation_size(n, options.validation_fraction)
        train, val = train_test_split(indices, test_size=size, random_state=options.seed)
    return np.asarray(train, dtype=np.intp), np.asarray(val, dtype=np.intp)


def _no_progress(fraction: float) -> None:
    pass


def _check_embeddings(embeddings: np.ndarray, num_examples: int) -> np.ndarray:
    if embeddings.ndim != 2 or embeddings.shape[0] != num_examples:
        raise ValueError(f"embeddings {embeddings.shape} do not match {num_examples} examples")
    if embeddings.shape[1] < 2 or not np.all(np.isfinite(embeddings)):
        raise ValueError("embeddings must be finite with at least two dimensions")
    return np.asarray(embeddings, dtype=np.float64)  # fit in float64; export float32


def _check_projection_size(x: np.ndarray, options: TrainOptions) -> None:
    dims = options.dimensions
    if dims is None or not 1 <= dims < x.shape[1]:
        raise InvalidRequest(
            f"a projection needs options.dimensions in [1, {x.shape[1]}), not {dims}",
            param="options.dimensions",
            code="invalid_option",
        )
    num_train = len(x) - validation_size(len(x), options.validation_fraction)
    if num_train <= dims:
        raise InvalidRequest(
            f"a {dims}-dimensional projection needs more than {dims} training examples, got {num_train}",
            param="examples",
            code="too_few_examples",
        )


def _params(weight: np.ndarray, bias: np.ndarray) -> HeadParams:
    return HeadParams(np.ascontiguousarray(weight, dtype=np.float32), np.ascontiguousarray(bias, dtype=np.float32))


def _affine(params: HeadParams, x: np.ndarray) -> np.ndarray:
    """What serving computes: float32 ``x @ W.T + b``."""
    y: np.ndarray = x.astype(np.float32) @ params.weight.T + params.bias
    return y


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function."""
    probability: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * z))
    return probability


Fitted = tuple[HeadParams, tuple[str, ...], dict[str, float]]


def _fit_classifier(
    x: np.ndarray,
    examples: Sequence[Example],
    train: np.ndarray,
    val: np.ndarray,
    options: TrainOptions,
    report: Progress,
) -> Fitted:
    y = np.array([str(e.label) for e in examples])
    model = LogisticRegression(C=options.regularization, max_iter=MAX_ITER)
    model.fit(x[train], y[train])
    labels = tuple(str(c) for c in model.classes_)
    coef, intercept = np.asarray(model.coef_), np.asarray(model.intercept_)
    if len(labels) == 2:  # sklearn's binary form p1 = sigmoid(w x + b) == softmax of [-(w x + b)/2, (w x + b)/2]
        coef, intercept = np.vstack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    params = _params(coef, intercept)
    report(0.9)
    predicted = np.asarray(labels)[np.argmax(_affine(params, x[val]), axis=1)]
    classes, counts = np.unique(y[train], return_counts=True)
    majority = classes[np.argmax(counts)]  # ties: the first label in sorted order
    metrics = {
        "accuracy": float(np.mean(predicted == y[val])),
        "macro_f1": float(f1_score(y[val], predicted, average="macro", zero_division=0)),
        "baseline_accuracy": float(np.mean(y[val] == majority)),  # always answer the train majority class
    }
    return params, labels, metrics


def _fit_multilabel(
    x: np.ndarray,
    examples: Sequence[Example],
    train: np.ndarray,
    val: np.ndarray,
    options: TrainOptions,
    report: Progress,
) -> Fitted:
    labels = labels_of(examples)
    column = {label: j for j, label in enumerate(labels)}
    truth = np.zeros((len(examples), len(labels)), dtype=bool)
    for i, example in enumerate(examples):
        if not isinstance(example.label, tuple):
            raise ValueError("multilabel examples need tuple labels (parse them with parse_examples)")
        truth[i, [column[label] for label in example.label]] = True
    weight = np.zeros((len(labels), x.shape[1]))
    bias = np.zeros(len(labels))
    for j in range(len(labels)):
        y = truth[train, j]
        if y.all() or not y.any():  # one class only: LogisticRegression cannot fit it; answer the constant
            bias[j] = CONSTANT_LOGIT if y.all() else -CONSTANT_LOGIT
        else:
            model = LogisticRegression(C=options.regularization, max_iter=MAX_ITER).fit(x[train], y)
            weight[j], bias[j] = model.coef_[0], model.intercept_[0]
        report(0.1 + 0.8 * (j + 1) / len(labels))
    params = _params(weight, bias)
    predicted = sigmoid(_affine(params, x[val])) >= options.threshold
    expected = truth[val]
    metrics = {  # a label neither true nor predicted in validation made no mistakes: its F1 counts as 1
        "micro_f1": float(f1_score(expected, predicted, average="micro", zero_division=1.0)),
        "macro_f1": float(f1_score(expected, predicted, average="macro", zero_division=1.0)),
        "subset_accuracy": float(np.mean(np.all(predicted == expected, axis=1))),
    }
    return params, labels, metrics


def _fit_regressor(
    x: np.ndarray,
    examples: Sequence[Example],
    train: np.ndarray,
    val: np.ndarray,
    options: TrainOptions,
    report: Progress,
) -> Fitted:
    y = np.array([float(e.label) for e in examples if isinstance(e.label, float)])
    if len(y) != len(examples):
        raise ValueError("regressor examples need float labels (parse them with parse_examples)")
    model = Ridge(alpha=options.regularization).fit(x[train], y[train])
    params = _params(np.asarray(model.coef_).reshape(1, -1), np.atleast_1d(model.intercept_))
    report(0.9)
    predicted = _affine(params, x[val])[:, 0].astype(np.float64)
    metrics = {
        "r2": float(r2_score(y[val], predicted)),
        "mae": float(mean_absolute_error(y[val], predicted)),
        "rmse": math.sqrt(float(mean_squared_error(y[val], predicted))),
        "baseline_mae": float(np.mean(np.abs(y[val] - np.mean(y[train])))),  # always answer the train mean
    }
    return params, (), metrics


def _fit_projection(
    x: np.ndarray,
    examples: Sequence[Example],
    train: np.ndarray,
    val: np.ndarray,
    options: TrainOptions,
    report: Progress,
) -> Fitted:
    pca = PCA(n_components=options.dimensions, random_state=options.seed).fit(x[train])
    components, mean = np.asarray(pca.components_), np.asarray(pca.mean_)
    params = _params(components, -(components @ mean))
    report(0.9)
    centered = x[val] - mean
    residual = centered - (centered @ components.T) @ components
    total = float(np.sum(centered**2))
    metrics = {
        "explained_variance": 1.0 - float(np.sum(residual**2)) / total if total > 0 else 1.0,
        "train_explained_variance": float(np.sum(pca.explained_variance_ratio_)),
    }
    return params, (), metrics


_FITTERS: dict[
    HeadKind, Callable[[np.ndarray, Sequence[Example], np.ndarray, np.ndarray, TrainOptions, Progress], Fitted]
] = {
    HeadKind.CLASSIFIER: _fit_classifier,
    HeadKind.MULTILABEL: _fit_multilabel,
    HeadKind.REGRESSOR: _fit_regressor,
    HeadKind.PROJECTION: _fit_projection,
}

"""Synthetic embeddings, head specs and a per-head reference implementation for the heads tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from polyray.heads.apply import HeadOutput
from polyray.heads.examples import Example
from polyray.heads.kinds import HeadKind, HeadParams, HeadSpec, HeadStatus
from polyray.types import ModelRef

REF = ModelRef("minilm", "1")
DIM = 48


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32, like the model's L2-normalized embeddings."""
    rows: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return rows


def clusters(
    num_per_class: Sequence[int], *, dim: int = DIM, spread: float = 0.4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around random unit centres: (embeddings (n, dim), class index per row)."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.normal(size=(len(num_per_class), dim)))
    y = np.repeat(np.arange(len(num_per_class)), num_per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), dim)) / np.sqrt(dim)
    return unit_rows(x), y


def class_examples(y: np.ndarray, names: Sequence[str]) -> list[Example]:
    return [Example(f"text {i}", names[label]) for i, label in enumerate(y)]


def make_spec(
    kind: HeadKind,
    params: HeadParams,
    *,
    name: str = "head",
    labels: tuple[str, ...] = (),
    threshold: float = 0.5,
    model: ModelRef = REF,
) -> HeadSpec:
    options = {"threshold": threshold} if kind is HeadKind.MULTILABEL else {}
    return HeadSpec(
        head_id=f"id-{name}",
        owner="team",
        name=name,
        kind=kind,
        model=model,
        status=HeadStatus.READY,
        dim_in=params.dim_in,
        dim_out=params.dim_out,
        labels=labels,
        options=options,
    )


def random_params(rng: np.random.Generator, dim_out: int, dim_in: int = DIM, scale: float = 3.0) -> HeadParams:
    weight = (scale * rng.normal(size=(dim_out, dim_in))).astype(np.float32)
    bias = rng.normal(size=dim_out).astype(np.float32)
    return HeadParams(weight, bias)


def random_head(rng: np.random.Generator, kind: HeadKind, index: int, dim_in: int = DIM) -> tuple[HeadSpec, HeadParams]:
    """A head of ``kind`` with random parameters, label count and (multilabel) threshold."""
    name = f"h{index}"
    if kind is HeadKind.CLASSIFIER:
        k = int(rng.integers(2, 7))
        params = random_params(rng, k, dim_in)
        return make_spec(kind, params, name=name, labels=tuple(f"c{j}" for j in range(k))), params
    if kind is HeadKind.MULTILABEL:
        k = int(rng.integers(1, 7))
        params = random_params(rng, k, dim_in)
        threshold = float(rng.uniform(0.2, 0.8))
        labels = tuple(f"m{j}" for j in range(k))
        return make_spec(kind, params, name=name, labels=labels, threshold=threshold), params
    if kind is HeadKind.REGRESSOR:
        params = random_params(rng, 1, dim_in)
        return make_spec(kind, params, name=name), params
    params = random_params(rng, int(rng.integers(1, 9)), dim_in)
    return make_spec(kind, params, name=name), params


def reference_output(spec: HeadSpec, params: HeadParams, row: np.ndarray) -> HeadOutput:
    """One head on one embedding, written the obvious way (float64), to check the stacked code against."""
    y = params.weight.astype(np.float64) @ row.astype(np.float64) + params.bias.astype(np.float64)
    if spec.kind is HeadKind.CLASSIFIER:
        p = np.exp(y - y.max())
        p /= p.sum()
        return {"label": spec.labels[int(np.argmax(y))], "scores": dict(zip(spec.labels, p.tolist(), strict=True))}
    if spec.kind is HeadKind.MULTILABEL:
        p = 1.0 / (1.0 + np.exp(-y))
        on = [label for label, score in zip(spec.labels, p, strict=True) if score >= spec.threshold]
        return {"labels": on, "scores": dict(zip(spec.labels, p.tolist(), strict=True))}
    if spec.kind is HeadKind.REGRESSOR:
        return {"value": float(y[0])}
    return {"embedding": y.tolist()}


def assert_outputs_close(got: HeadOutput, want: HeadOutput, *, atol: float = 1e-5) -> None:
    """Same keys, same discrete answers (labels), numbers equal to float32 precision."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key == "scores":
            assert list(got[key]) == list(value)  # label order kept
            np.testing.assert_allclose(list(got[key].values()), list(value.values()), rtol=1e-5, atol=atol)
        elif key in ("embedding", "value"):
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=atol)
        else:
            assert got[key] == value

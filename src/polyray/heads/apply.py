"""Apply many heads of one model version to a batch of embeddings as one matrix product.

A request may name dozens of heads, and every head's marginal cost must stay a few percent of
the model's forward pass. So ``HeadStack`` concatenates all the heads' weights once, at
construction, and ``compute`` does ONE ``x @ W_all.T + b_all`` followed by a fixed number of
vectorized numpy calls per *kind*, not per head: the stack's rows are grouped by kind, so each
kind's outputs are one contiguous block, and a classifier block gets a segmented softmax
(``reduceat`` over the heads' column ranges). Only ``to_rows`` (the conversion to JSON-ready
dicts, which the response needs anyway) walks the heads in Python.

Outputs per head (plain data, ready for JSON):

* classifier: ``{"label": top label, "scores": {label: probability}}``
* multilabel: ``{"labels": [labels with score >= threshold], "scores": {label: probability}}``
* regressor: ``{"value": float}``
* projection: ``{"embedding": [float, ...]}``

Embeddings are trusted to be finite (they come from the model); NaN rows give NaN scores.

The product is a small GEMM (rows x 384 x sum of dim_out); run the serving process with
single-threaded numpy BLAS (e.g. ``threadpoolctl.threadpool_limits(1, "blas")`` at start):
multi-threaded OpenBLAS on such sizes measured 4-100x slower when the cores are busy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress
from typing import Any

import numpy as np

from polyray.heads.kinds import HeadKind, HeadParams, HeadSpec
from polyray.types import ModelRef

HeadOutput = dict[str, Any]

_KIND_ORDER = (HeadKind.CLASSIFIER, HeadKind.MULTILABEL, HeadKind.REGRESSOR, HeadKind.PROJECTION)


@dataclass(frozen=True)
class _Slot:
    """Where one head's outputs lie: columns ``start:stop`` of its kind's block."""

    kind: HeadKind
    start: int
    stop: int
    labels: tuple[str, ...]
    segment: int  # classifier heads: index among the classifier heads (column of ``top``)


def _check_head(spec: HeadSpec, params: HeadParams) -> None:
    dim_out = params.dim_out
    if (spec.dim_in and spec.dim_in != params.dim_in) or (spec.dim_out and spec.dim_out != dim_out):
        raise ValueError(
            f"head {spec.ref}: spec says {spec.dim_out}x{spec.dim_in}, params are {dim_out}x{params.dim_in}"
        )
    if spec.kind is HeadKind.CLASSIFIER and not 2 <= len(spec.labels) == dim_out:
        raise ValueError(f"classifier {spec.ref}: {len(spec.labels)} labels for {dim_out} outputs")
    if spec.kind is HeadKind.MULTILABEL and not 1 <= len(spec.labels) == dim_out:
        raise ValueError(f"multilabel {spec.ref}: {len(spec.labels)} labels for {dim_out} outputs")
    if spec.kind is HeadKind.REGRESSOR and dim_out != 1:
        raise ValueError(f"regressor {spec.ref}: {dim_out} outputs, not 1")


class HeadStack:
    """Heads bound to one model version, stacked into one (sum of dim_out, dim_in) float32 matrix."""

    def __init__(self, heads: Sequence[tuple[HeadSpec, HeadParams]]) -> None:
        if not heads:
            raise ValueError("a HeadStack needs at least one head")
        self.model: ModelRef = heads[0][0].model
        self.dim_in: int = heads[0][1].dim_in
        for spec, params in heads:
            if spec.model != self.model:
                raise ValueError(f"head {spec.ref} is for {spec.model}, not {self.model}: one stack, one model version")
            if params.dim_in != self.dim_in:
                raise ValueError(f"head {spec.ref} takes {params.dim_in} dimensions, not {self.dim_in}")
            _check_head(spec, params)
        self.specs: tuple[HeadSpec, ...] = tuple(spec for spec, _ in heads)
        slots: list[_Slot | None] = [None] * len(heads)
        weights: list[np.ndarray] = []
        biases: list[np.ndarray] = []
        self._blocks: dict[HeadKind, slice] = {}
        cls_starts: list[int] = []
        thresholds: list[np.ndarray] = []
        offset = 0
        for kind in _KIND_ORDER:
            block_start = offset
            for i, (spec, params) in enumerate(heads):
                if spec.kind is not kind:
                    continue
                start = offset - block_start
                slots[i] = _Slot(kind, start, start + params.dim_out, spec.labels, len(cls_starts))
                if kind is HeadKind.CLASSIFIER:
                    cls_starts.append(start)
                elif kind is HeadKind.MULTILABEL:
                    thresholds.append(np.full(params.dim_out, spec.threshold, dtype=np.float32))
                weights.append(params.weight)
                biases.append(params.bias)
                offset += params.dim_out
            self._blocks[kind] = slice(block_start, offset)
        self.dim_out: int = offset
        self._slots = tuple(slot for slot in slots if slot is not None)
        # (dim_in, dim_out) contiguous: x @ W_t is a plain row-major GEMM
        self._weight_t = np.ascontiguousarray(np.concatenate(weights).astype(np.float32).T)
        self._bias = np.concatenate(biases).astype(np.float32)
        self._cls_starts = np.asarray(cls_starts, dtype=np.intp)
        cls_width = self._blocks[HeadKind.CLASSIFIER].stop
        self._cls_sizes = np.diff(np.append(self._cls_starts, cls_width))
        self._cls_rank = cls_width - np.arange(cls_width)  # larger for earlier columns: first maximum wins
        self._ml_threshold = np.concatenate(thresholds) if thresholds else np.zeros(0, dtype=np.float32)

    def __len__(self) -> int:
        return len(self._slots)

    def apply(self, embeddings: np.ndarray) -> list[list[HeadOutput]]:
        """Outputs per input row, then per head in the stack's order."""
        return self.compute(embeddings).to_rows()

    def compute(self, embeddings: np.ndarray) -> StackOutputs:
        """The numeric outputs, column-oriented; ``to_rows`` turns them into per-row dicts."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"embeddings {x.shape} do not fit heads of dimension {self.dim_in}")
        y = x @ self._weight_t
        y += self._bias
        cls = y[:, self._blocks[HeadKind.CLASSIFIER]]
        probs, top = self._softmax(cls) if len(self._cls_starts) else (cls, np.zeros((len(x), 0), dtype=np.intp))
        multi = y[:, self._blocks[HeadKind.MULTILABEL]]
        scores = 0.5 * (1.0 + np.tanh(0.5 * multi))  # sigmoid without overflow
        return StackOutputs(
            self._slots,
            probs,
            top,
            scores,
            scores >= self._ml_threshold,
            y[:, self._blocks[HeadKind.REGRESSOR]],
            y[:, self._blocks[HeadKind.PROJECTION]],
        )

    def _softmax(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Softmax within each classifier head's columns, and each head's first argmax (local index)."""
        starts, sizes = self._cls_starts, self._cls_sizes
        peak = np.repeat(np.maximum.reduceat(logits, starts, axis=1), sizes, axis=1)
        exp = np.exp(logits - peak)
        probs = exp / np.repeat(np.add.reduceat(exp, starts, axis=1), sizes, axis=1)
        ranked = np.where(logits == peak, self._cls_rank, 0)
        top = len(self._cls_rank) - np.maximum.reduceat(ranked, starts, axis=1) - starts
        return probs, top


@dataclass(frozen=True)
class StackOutputs:
    """One batch's head outputs by kind block (rows = inputs); ``to_rows`` builds the dicts."""

    slots: tuple[_Slot, ...]
    class_probs: np.ndarray  # (n, classifier columns)
    class_top: np.ndarray  # (n, classifier heads): index of each head's top label
    multi_scores: np.ndarray  # (n, multilabel columns)
    multi_on: np.ndarray  # (n, multilabel columns) bool: score >= the head's threshold
    values: np.ndarray  # (n, regressor heads)
    projections: np.ndarray  # (n, projection columns)

    def to_rows(self) -> list[list[HeadOutput]]:
        """Per-row lists of per-head dicts, in the stack's head order.

        Head-major: one branch on the kind per head, then a tight loop over rows. Each block is
        converted with one ``.tolist()`` (Python floats; list slicing is cheaper than numpy
        indexing). Label and score lists have equal lengths by construction (``zip`` strict=False).
        """
        rows: list[list[HeadOutput]] = [[{}] * len(self.slots) for _ in range(len(self.values))]
        probs_rows, top_rows = self.class_probs.tolist(), self.class_top.tolist()
        score_rows, on_rows = self.multi_scores.tolist(), self.multi_on.tolist()
        value_rows, projection_rows = self.values.tolist(), self.projections.tolist()
        for position, slot in enumerate(self.slots):
            kind, start, stop, labels = slot.kind, slot.start, slot.stop, slot.labels
            if kind is HeadKind.CLASSIFIER:
                segment = slot.segment
                for row, probs, top in zip(rows, probs_rows, top_rows, strict=False):
                    row[position] = {
                        "label": labels[top[segment]],
                        "scores": dict(zip(labels, probs[start:stop], strict=False)),
                    }
            elif kind is HeadKind.MULTILABEL:
                for row, scores, on in zip(rows, score_rows, on_rows, strict=False):
                    row[position] = {
                        "labels": list(compress(labels, on[start:stop])),
                        "scores": dict(zip(labels, scores[start:stop], strict=False)),
                    }
            elif kind is HeadKind.REGRESSOR:
                for row, values in zip(rows, value_rows, strict=False):
                    row[position] = {"value": values[start]}
            else:
                for row, projection in zip(rows, projection_rows, strict=False):
                    row[position] = {"embedding": projection[start:stop]}
        return rows

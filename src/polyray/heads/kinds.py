"""What a head is: its kind, its description (``HeadSpec``) and its parameters (``HeadParams``).

Every kind is one affine map of the embedding, ``y = W x + b``, followed by the kind's output
function, so any set of heads bound to one model version can be applied as a single stacked
matrix product (``heads.apply``):

=============  ===============================  ===========================================
kind           output function                  output
=============  ===============================  ===========================================
classifier     softmax over ``labels``          the top label and every label's probability
multilabel     sigmoid per label                the labels at or over the threshold, scores
regressor      identity (``dim_out`` = 1)       one number
projection     identity (``dim_out`` = k)       a k-dimensional vector (PCA of the examples)
=============  ===============================  ===========================================

A head belongs to one client (``owner``) and one model version: the embedding spaces of two
versions are different spaces, so a head is never applied to another version's vectors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import numpy as np

from polyray.errors import InvalidRequest
from polyray.types import ModelRef

HEAD_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class HeadKind(StrEnum):
    CLASSIFIER = "classifier"
    MULTILABEL = "multilabel"
    REGRESSOR = "regressor"
    PROJECTION = "projection"


class HeadStatus(StrEnum):
    PENDING = "pending"  # accepted, waiting for the trainer
    TRAINING = "training"  # embedding its examples, then fitting
    READY = "ready"  # parameters stored; can be applied
    FAILED = "failed"  # ``error`` says why


def check_head_name(name: str) -> str:
    """Head names: lowercase letters, digits, ``_ . -``; 1-63 characters; unique per owner."""
    if not isinstance(name, str) or not HEAD_NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid head name {name!r}: use 1-63 lowercase letters, digits, '_', '.', '-'",
            param="name",
            code="invalid_head_name",
        )
    return name


@dataclass(frozen=True)
class HeadParams:
    """``y = weight @ x + bias``: ``weight`` float32 (dim_out, dim_in), ``bias`` float32 (dim_out,)."""

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"head weight {self.weight.shape} and bias {self.bias.shape} do not fit")

    @property
    def dim_out(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim_in(self) -> int:
        return int(self.weight.shape[1])


@dataclass(frozen=True)
class HeadSpec:
    """One head's description, as stored (everything but its parameters and training examples).

    ``labels``: output order of a classifier or multilabel head; empty for the other kinds.
    ``options``: what training was asked for (``validation_fraction``, ``dimensions`` for a
    projection, ``threshold`` for multilabel, ``seed``).
    ``metrics``: validation figures written by training (``accuracy``, ``macro_f1``, ``r2`` ...).
    """

    head_id: str
    owner: str
    name: str
    kind: HeadKind
    model: ModelRef
    status: HeadStatus
    dim_in: int = 0
    dim_out: int = 0
    labels: tuple[str, ...] = ()
    shared_with: frozenset[str] = frozenset()
    options: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    num_examples: int = 0
    progress: float = 0.0  # 0..1 while pending or training
    error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def ref(self) -> str:
        """How other clients name it: ``owner/name`` (its owner may say just ``name``)."""
        return f"{self.owner}/{self.name}"

    def visible_to(self, client: str) -> bool:
        return client == self.owner or client in self.shared_with

    @property
    def threshold(self) -> float:
        """Decision threshold of a multilabel head's sigmoid scores."""
        return float(self.options.get("threshold", 0.5))

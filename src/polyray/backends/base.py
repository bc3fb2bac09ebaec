"""The one small interface every backend implements.

Tokenizing is separate from encoding because the engine needs each text's length *before*
batching: the batch budget is counted in padded tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Tokenized:
    """One text as the model will see it; ``truncated`` says it was cut to ``max_seq_tokens``."""

    ids: tuple[int, ...]
    truncated: bool


class Backend(Protocol):
    dim: int
    max_seq_tokens: int
    description: str
    padding_free: bool  # True: compute grows with real tokens only, not longest × count
    # The numeric precision of the build ("fp32", "int8"). It is part of the served version: the
    # config refuses an int8 build whose version string does not name it (``ModelConfig``).
    precision: str
    # Least cosine between this backend's vectors and the fp32 torch reference over the probe
    # set, measured at load (``backends.calibrate``): 1.0 for the reference itself, None where
    # there is no reference (the dummy backend).
    cosine_to_reference: float | None

    def tokenize(self, texts: Sequence[str]) -> list[Tokenized]:
        """Token ids, special tokens included, cut to ``max_seq_tokens``. Thread-safe."""
        ...

    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Vectors (float32, ``len(batch) × dim``) for token-id sequences. Called from one worker thread."""
        ...


def pad_batch(batch: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence: (ids, attention mask), both int64 ``len(batch) × longest``."""
    longest = max(len(seq) for seq in batch)
    ids = np.full((len(batch), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), longest), dtype=np.int64)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask

"""A real, deterministic backend for tests, like httpx's mock transport.

Each vector is a pure function of the text's token ids (a seeded Gaussian, L2-normalized), so
tests can assert exact outputs, detect mixed-up rows and run without weights. Tokens are words
and punctuation marks hashed into a 30k vocabulary between [CLS]=101 and [SEP]=102, so lengths
behave like a real tokenizer's. ``seconds_per_token`` makes ``encode`` sleep for the padded
cost of the batch, which gives engine tests a backend whose time behaves like compute.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Sequence

import numpy as np

from polyray.backends.base import Tokenized

_WORD = re.compile(r"\w+|[^\w\s]")
CLS_ID, SEP_ID, VOCAB = 101, 102, 30522


class DummyBackend:
    def __init__(self, dim: int = 384, max_seq_tokens: int = 256, seconds_per_token: float = 0.0) -> None:
        if dim < 1 or max_seq_tokens < 3:
            raise ValueError("dummy backend needs dim >= 1 and max_seq_tokens >= 3")
        self.dim = dim
        self.max_seq_tokens = max_seq_tokens
        self.seconds_per_token = seconds_per_token
        self.description = f"dummy (dim {dim})"
        self.padding_free = False
        self.precision = "fp32"
        self.cosine_to_reference: float | None = None  # no reference model to compare with
        self.num_batches = 0
        self.batch_sizes: list[int] = []

    def tokenize(self, texts: Sequence[str]) -> list[Tokenized]:
        out = []
        for text in texts:
            words = [1000 + zlib.crc32(w.lower().encode()) % (VOCAB - 1000) for w in _WORD.findall(text)]
            limit = self.max_seq_tokens - 2
            out.append(Tokenized((CLS_ID, *words[:limit], SEP_ID), truncated=len(words) > limit))
        return out

    def vector(self, ids: Sequence[int]) -> np.ndarray:
        """The vector for one token sequence: the ground truth tests compare against."""
        seed = zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes())
        vec = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return vec / np.linalg.norm(vec)

    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        if self.seconds_per_token:
            time.sleep(self.seconds_per_token * max(len(s) for s in batch) * len(batch))
        self.num_batches += 1
        self.batch_sizes.append(len(batch))
        return np.stack([self.vector(ids) for ids in batch])

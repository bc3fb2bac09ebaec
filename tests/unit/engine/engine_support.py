"""Shared by the engine tests: the model ref, a gated recording backend, and a polling wait."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from polyray.backends.dummy import DummyBackend
from polyray.types import ModelRef

REF = ModelRef("minilm", "1")
GATE_TIMEOUT_S = 10.0


class ProbeBackend(DummyBackend):
    """DummyBackend that records every batch it is asked for, can be held on a gate and can be poisoned."""

    def __init__(self, *args: Any, poison_word: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.attempted: list[list[tuple[int, ...]]] = []
        self.poison_id = self.tokenize([poison_word])[0].ids[1] if poison_word else None

    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.attempted.append([tuple(s) for s in batch])
        self.started.set()
        if not self.gate.wait(GATE_TIMEOUT_S):
            raise RuntimeError("test gate never opened")
        if self.poison_id is not None and any(self.poison_id in s for s in batch):
            raise ValueError("poisoned input")
        return super().encode(batch)

    def seen_ids(self) -> set[tuple[int, ...]]:
        return {ids for batch in self.attempted for ids in batch}

    def times_seen(self, text: str) -> int:
        ids = self.tokenize([text])[0].ids
        return sum(row == ids for batch in self.attempted for row in batch)


async def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)

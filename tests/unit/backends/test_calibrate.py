"""Measuring the budget curve and the fitter's loop, on the dummy backend whose time is compute-like."""

from __future__ import annotations

import numpy as np
import pytest

from polyray.backends.calibrate import (
    compare_to_reference,
    measure_budget_curve,
    probe_texts,
    row_cosines,
)
from polyray.backends.dummy import DummyBackend
from polyray.engine.budget_fit import BudgetFitter
from polyray.policies import BatchPolicy, FitPolicy


class OverheadDummy(DummyBackend):
    """The dummy backend plus a fixed cost per call, like a real framework's dispatch."""

    def __init__(self, overhead_s: float, seconds_per_token: float) -> None:
        super().__init__(seconds_per_token=seconds_per_token)
        self.overhead_s = overhead_s

    def encode(self, batch):  # type: ignore[no-untyped-def]
        import time

        time.sleep(self.overhead_s)
        return super().encode(batch)


def test_curve_follows_the_planner_and_shows_the_fixed_cost() -> None:
    backend = OverheadDummy(overhead_s=0.002, seconds_per_token=2e-6)
    corpus = [t.ids for t in backend.tokenize(probe_texts(64))]
    points = measure_budget_curve(
        backend, corpus, budgets=(64, 512, 4096), base_policy=BatchPolicy(), time_per_budget_s=0.12, num_rounds=2
    )
    assert [p.budget_tokens for p in points] == [64, 512, 4096]
    assert all(p.num_batches >= 2 for p in points)
    small, _, large = points
    # The planner packs more per call at a larger budget, so the fixed cost is shared more widely.
    assert large.num_tokens / large.num_batches > 4 * small.num_tokens / small.num_batches
    assert large.tokens_per_s > 1.5 * small.tokens_per_s
    assert large.p90_batch_ms > small.p90_batch_ms
    assert all(p.cost_tokens >= p.num_tokens for p in points)  # padded cost: the dummy is not padding-free


def test_fitter_decides_then_redecides_on_drift() -> None:
    now = [0.0]
    backend = OverheadDummy(overhead_s=0.001, seconds_per_token=1e-6)
    fitter = BudgetFitter(
        FitPolicy(latency_target_ms=50, drift_min_batches=8, min_refit_interval_s=10),
        budgets=(64, 256, 1024),
        time_per_budget_s=0.08,
        corpus=probe_texts(48),
        clock=lambda: now[0],
        name="dummy@1",
    )
    assert fitter.observe_batch([10, 20], 0.01) is None  # nothing to compare with before the first fit
    decision = fitter.fit(backend, BatchPolicy())
    assert decision.budget_tokens in (64, 256, 1024) and decision.drift_factor == 1.0
    assert fitter.decision is decision
    lengths = [30] * 8
    predicted = decision.cost.predict_s(max(lengths) * len(lengths))
    now[0] = 100.0
    updates = [fitter.observe_batch(lengths, 3 * predicted) for _ in range(8)]
    assert updates[:-1] == [None] * 7
    redone = updates[-1]
    assert redone is not None and redone.drift_factor == pytest.approx(3.0, rel=0.01)
    assert redone.expected_batch_ms > decision.expected_batch_ms
    assert redone.budget_tokens <= decision.budget_tokens  # slower host, same target: no larger batches
    assert fitter.decision is redone
    assert fitter.observe_batch(lengths, 3 * predicted) is None  # drift state restarts after a decision


def test_compare_to_reference_reports_the_worst_input() -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((10, 8)).astype(np.float32)
    probe = [(i,) for i in range(10)]

    def encode(batch):  # type: ignore[no-untyped-def]
        rows = [reference[ids[0]].copy() for ids in batch]
        for r, ids in zip(rows, batch, strict=True):
            if ids[0] == 7 and len(batch) == 1:  # wrong only when run alone
                r += 0.5 * rng.standard_normal(8).astype(np.float32)
        return np.stack(rows)

    report = compare_to_reference(encode, reference, probe, batch_size=4)
    assert report.worst_index == 7 and report.min_cosine < 0.99 and report.num_inputs == 10
    assert row_cosines(reference, reference) == pytest.approx(np.ones(10))

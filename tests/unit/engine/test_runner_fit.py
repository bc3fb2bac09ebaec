"""The runner applies the fitted batch budget: at start, when the fitter sees drift, and on demand.

The measurement itself runs for real (``BudgetFitter`` on a ``DummyBackend`` whose ``encode``
sleeps in proportion to the padded tokens); the decisions the scripted fitter returns come from
the pure chooser on synthetic curves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

import pytest
from engine_support import REF
from test_budget_fit import synthetic_curve

from polyray.backends.base import Backend
from polyray.backends.dummy import DummyBackend
from polyray.engine.budget_fit import ArrivalRate, BudgetDecision, BudgetFitter, LinearCost, choose_budget
from polyray.engine.observer import NullObserver
from polyray.engine.queue import Entry
from polyray.engine.runner import ModelRunner
from polyray.policies import BatchPolicy, FitPolicy


class ScriptedFitter:
    """A fitter whose decisions the test sets: ``fit`` returns ``first``; the ``drift_after``-th
    observed batch returns ``drifted``."""

    def __init__(self, first: BudgetDecision, drifted: BudgetDecision | None = None, drift_after: int = 3) -> None:
        self.first, self.drifted, self.drift_after = first, drifted, drift_after
        self.decision: BudgetDecision | None = None
        self.observed: list[tuple[list[int], float]] = []
        self.num_fits = 0

    def fit(self, backend: Backend, base_policy: BatchPolicy | None = None) -> BudgetDecision:
        self.num_fits += 1
        self.decision = self.first
        return self.first

    def observe_batch(self, lengths: Sequence[int], compute_s: float) -> BudgetDecision | None:
        self.observed.append((list(lengths), compute_s))
        if self.drifted is not None and len(self.observed) == self.drift_after:
            self.decision = self.drifted
            return self.drifted
        return None


def decision(overhead_s: float, s_per_token: float, target_ms: float = 500.0) -> BudgetDecision:
    return choose_budget(synthetic_curve(overhead_s, s_per_token), FitPolicy(latency_target_ms=target_ms))


async def submit_texts(runner: ModelRunner, backend: DummyBackend, texts: list[str]) -> list[Entry]:
    loop = asyncio.get_running_loop()
    now_s = runner.clock()
    entries = [Entry(t.ids, now_s, now_s + 30.0, loop.create_future()) for t in backend.tokenize(texts)]
    runner.submit(entries)
    return entries


async def test_measured_fit_is_applied_before_serving() -> None:
    backend = DummyBackend(dim=8, seconds_per_token=2e-6)  # 1,000 padded tokens ≈ 2 ms
    fitter = BudgetFitter(FitPolicy(latency_target_ms=50.0), budgets=(128, 512, 2048), time_per_budget_s=0.05)
    configured = BatchPolicy(budget_tokens=4096, max_wait_ms=7.0, overhead_tokens=64)
    runner = ModelRunner(REF, backend, configured, 100, NullObserver(), fitter=fitter)
    await runner.start()
    try:
        assert fitter.decision is not None
        assert fitter.decision.budget_tokens in (128, 512, 2048)
        assert runner.policy == fitter.decision.apply(configured)
        assert runner.configured_policy == configured
        report = runner.batching_report()
        assert report["fitted"] and report["budget_tokens"] == fitter.decision.budget_tokens
        assert [p["budget_tokens"] for p in report["decision"]["points"]] == [128, 512, 2048]
        entries = await submit_texts(runner, backend, ["served after the fit", "and this one"])
        await asyncio.wait_for(asyncio.gather(*(e.future for e in entries)), 5.0)
    finally:
        await runner.stop()


async def test_drift_redecision_replaces_the_policy_and_refit_on_demand_measures_again() -> None:
    backend = DummyBackend(dim=8)
    fast, slow = decision(0.001, 5e-6), decision(0.004, 100e-6, target_ms=100.0)
    assert (fast.budget_tokens, fast.max_wait_ms) != (slow.budget_tokens, slow.max_wait_ms)
    fitter = ScriptedFitter(fast, slow, drift_after=3)
    runner = ModelRunner(REF, backend, BatchPolicy(max_wait_ms=0.0), 100, NullObserver(), fitter=fitter)
    await runner.start()
    try:
        assert runner.policy.budget_tokens == fast.budget_tokens
        for i in range(3):  # one batch each: the worker is free and nothing else waits
            entries = await submit_texts(runner, backend, [f"text number {i}"])
            await asyncio.wait_for(entries[0].future, 5.0)
        assert len(fitter.observed) == 3
        assert all(lengths == [5] and compute_s > 0 for lengths, compute_s in fitter.observed)
        assert (runner.policy.budget_tokens, runner.policy.max_wait_ms) == (slow.budget_tokens, slow.max_wait_ms)
        assert await runner.refit() is fast
        assert fitter.num_fits == 2 and runner.policy.budget_tokens == fast.budget_tokens
    finally:
        await runner.stop()


async def test_refit_without_a_fitter_is_an_error() -> None:
    runner = ModelRunner(REF, DummyBackend(dim=4), BatchPolicy(), 10, NullObserver())
    with pytest.raises(ValueError, match="no budget fitter"):
        await runner.refit()
    assert runner.batching_report()["fitted"] is False


async def lone_request_finishes(overhead_s: float) -> bool:
    """Submit one text at low load on a frozen clock with a 10 s fitted wait; does it run?

    The clock never moves, so the maximum wait can never expire: the entry runs only if the
    runner decided that waiting cannot pay.
    """
    backend = DummyBackend(dim=4)
    fitted = decision(0.001, 5e-6)
    fitted = replace(fitted, max_wait_ms=10_000.0, cost=LinearCost(overhead_s, fitted.cost.s_per_token))
    runner = ModelRunner(
        REF, backend, BatchPolicy(), 10, NullObserver(), clock=lambda: 100.0, fitter=ScriptedFitter(fitted)
    )
    await runner.start()
    try:
        entries = await submit_texts(runner, backend, ["a lone sentence"])
        done, _ = await asyncio.wait([entries[0].future], timeout=0.5)
        return bool(done)
    finally:
        entries[0].future.cancel()
        await runner.stop()


async def test_lone_request_at_low_load_skips_the_wait_only_when_waiting_cannot_pay() -> None:
    # One arrival per τ: rate ≈ 1/s. × 1 ms call cost = 0.001 expected joiners: run now.
    assert await lone_request_finishes(overhead_s=0.001)
    # × 10 s "call cost" = 10 expected joiners: worth waiting for (and the frozen clock never lets it go).
    assert not await lone_request_finishes(overhead_s=10.0)


def test_arrival_rate_reads_a_steady_stream_and_fades() -> None:
    rate = ArrivalRate(tau_s=1.0)
    assert rate.rate_at(0.0) == 0.0
    for i in range(2000):
        rate = rate.observe(i * 0.005)  # 200 per second for 10 s
    assert rate.rate_at(10.0) == pytest.approx(200.0, rel=0.01)
    assert rate.rate_at(15.0) < 2.0
    assert rate.observe(10.0, count=50).rate_at(10.0) == pytest.approx(rate.rate_at(10.0) + 50.0)

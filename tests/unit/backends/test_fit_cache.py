"""The batch-budget fit kept on disk: reused at the next start on the same machine and build only.

On the dummy backend with a per-call sleep, so a measurement is real timing but short; the
number of ``encode`` calls tells whether a fit measured or read its curve back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polyray.backends import calibrate
from polyray.backends.calibrate import FitCache, machine_fingerprint, probe_texts
from polyray.backends.dummy import DummyBackend
from polyray.engine.budget_fit import BudgetFitter
from polyray.errors import ModelLoadError
from polyray.policies import BatchPolicy, FitPolicy

IDENTITY = {"backend": "torch", "precision": "fp32", "execution": "auto", "threads": 2, "max_seq_tokens": None}


class CountingDummy(DummyBackend):
    """Counts forward calls: zero calls during a fit means the curve came from the cache."""

    def __init__(self) -> None:
        super().__init__(seconds_per_token=2e-6)
        self.num_calls = 0

    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.num_calls += 1
        return super().encode(batch)


def fitter(
    directory: Path, identity: dict[str, Any] | None = None, digest: str = "w1", reuse_cached: bool = True
) -> BudgetFitter:
    return BudgetFitter(
        FitPolicy(latency_target_ms=50),
        budgets=(64, 256, 1024),
        time_per_budget_s=0.02,
        corpus=probe_texts(32),
        name="dummy@1",
        cache=FitCache(directory, identity or IDENTITY, lambda: digest),
        reuse_cached=reuse_cached,
    )


def fit_calls(f: BudgetFitter, policy: BatchPolicy | None = None) -> int:
    backend = CountingDummy()
    f.fit(backend, policy or BatchPolicy())
    return backend.num_calls


def test_the_next_start_reuses_the_measured_curve(tmp_path: Path) -> None:
    first = fitter(tmp_path)
    assert fit_calls(first) > 0 and not first.from_cache
    assert len(list(tmp_path.glob("*.json"))) == 1
    second = fitter(tmp_path)
    assert fit_calls(second) == 0 and second.from_cache
    assert first.decision is not None and second.decision is not None
    assert second.decision.budget_tokens == first.decision.budget_tokens
    assert second.decision.max_wait_ms == pytest.approx(first.decision.max_wait_ms)
    assert [p.budget_tokens for p in second.decision.points] == [64, 256, 1024]


@pytest.mark.parametrize(
    ("change", "value"),
    [("threads", 4), ("precision", "int8"), ("execution", "padded"), ("backend", "onnx"), ("max_seq_tokens", 128)],
)
def test_another_build_measures_again(tmp_path: Path, change: str, value: object) -> None:
    assert fit_calls(fitter(tmp_path)) > 0
    assert fit_calls(fitter(tmp_path, {**IDENTITY, change: value})) > 0
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_other_weights_measure_again(tmp_path: Path) -> None:
    assert fit_calls(fitter(tmp_path, digest="w1")) > 0
    assert fit_calls(fitter(tmp_path, digest="w2")) > 0
    assert fit_calls(fitter(tmp_path, digest="w1")) == 0


def test_another_machine_measures_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fit_calls(fitter(tmp_path)) > 0
    real = machine_fingerprint()
    monkeypatch.setattr(calibrate, "machine_fingerprint", lambda: {**real, "num_usable_cpus": 64})
    assert fit_calls(fitter(tmp_path)) > 0


def test_another_planner_window_measures_again(tmp_path: Path) -> None:
    assert fit_calls(fitter(tmp_path), BatchPolicy(window=64)) > 0
    assert fit_calls(fitter(tmp_path), BatchPolicy(window=32)) > 0


def test_reuse_off_forces_a_measurement(tmp_path: Path) -> None:
    """``reuse_budget_fit = false`` (or ``$POLYRAY_REFIT=1``, mapped onto it by polyray.config)."""
    assert fit_calls(fitter(tmp_path)) > 0
    assert fit_calls(fitter(tmp_path)) == 0  # the kept curve is used ...
    assert fit_calls(fitter(tmp_path, reuse_cached=False)) > 0  # ... unless told to measure


def test_a_refit_on_demand_measures_and_is_what_the_next_start_reads(tmp_path: Path) -> None:
    running = fitter(tmp_path)
    backend = CountingDummy()
    first = running.fit(backend, BatchPolicy())
    calls = backend.num_calls
    running.fit(backend, first.apply(BatchPolicy()))  # the admin route: the fitted policy, measured again
    assert backend.num_calls > calls and not running.from_cache
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert len(list(tmp_path.glob("*.json"))) == 1  # the start's key: one file, the newest curve
    restarted = fitter(tmp_path)
    assert fit_calls(restarted) == 0
    assert [p.compute_s for p in restarted.decision.points] == [p["compute_s"] for p in record["curve"]]  # type: ignore[union-attr]


def test_a_damaged_file_costs_one_measurement_and_no_error(tmp_path: Path) -> None:
    assert fit_calls(fitter(tmp_path)) > 0
    path = next(tmp_path.glob("*.json"))
    for damage in ("{not json", json.dumps({"key": "other"}), json.dumps({"curve": []})):
        path.write_text(damage)
        assert fit_calls(fitter(tmp_path)) > 0
        assert fit_calls(fitter(tmp_path)) == 0  # measured again and rewritten


def test_unhashable_weights_fit_without_a_cache(tmp_path: Path) -> None:
    def broken() -> str:
        raise ModelLoadError("no weight files")

    f = BudgetFitter(
        budgets=(64, 256), time_per_budget_s=0.02, corpus=probe_texts(16), cache=FitCache(tmp_path, IDENTITY, broken)
    )
    assert fit_calls(f) > 0 and f.decision is not None
    assert list(tmp_path.iterdir()) == []


def test_drift_still_redecides_after_a_cached_start(tmp_path: Path) -> None:
    fit_calls(fitter(tmp_path))
    now = [0.0]
    f = fitter(tmp_path)
    f.policy = FitPolicy(latency_target_ms=50, drift_min_batches=8, min_refit_interval_s=10)
    f.clock = lambda: now[0]
    decision = f.fit(CountingDummy(), BatchPolicy())
    lengths = [30] * 8
    slow_s = 3 * decision.cost.predict_s(max(lengths) * len(lengths))
    now[0] = 100.0
    updates = [f.observe_batch(lengths, slow_s) for _ in range(8)]
    assert updates[-1] is not None and updates[-1].drift_factor == pytest.approx(3.0, rel=0.01)


def test_machine_fingerprint_keeps_the_kernel_flags_only() -> None:
    cpuinfo = (
        "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu vme avx avx2 fma sse4_2 avx512f avx512_vnni ht\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx\n"
    )
    print_ = machine_fingerprint(cpuinfo)
    assert print_["cpu_model"] == "AMD EPYC 9B14"
    assert print_["kernel_flags"] == ["avx", "avx2", "avx512_vnni", "avx512f", "fma", "sse4_2"]
    assert print_["num_usable_cpus"] >= 1
    assert machine_fingerprint("")["kernel_flags"] == []

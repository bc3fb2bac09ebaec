"""``polyray.server``: the pure parts (the connection budget under a descriptor limit, the
displacement order of the connection guard, which requests a draining server refuses) and the
composition root (start and stop order, what ``build_server`` wires, the ledger's last flush)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyray.config import ModelConfig, Settings, TenancyConfig
from polyray.observability.metrics import Metrics
from polyray.server import (
    FD_RESERVE,
    Admission,
    ConnectionGuard,
    ConnectionLimits,
    Server,
    Slot,
    build_server,
    connection_budget,
    display_url,
    is_new_work,
    lingering_slots,
)
from polyray.tenancy.reports import usage_totals
from polyray.tenancy.service import BootstrapKeys
from polyray.types import EmbedRequest, ModelRef


@given(configured=st.integers(1, 2_000_000), fd_limit=st.integers(64, 2_000_000))
def test_connections_and_lingering_slots_fit_under_the_descriptor_limit(configured: int, fd_limit: int) -> None:
    budget = connection_budget(configured, fd_limit)
    assert 1 <= budget <= configured
    reserve = min(FD_RESERVE, fd_limit // 2)
    assert budget + lingering_slots(budget) <= fd_limit - reserve


@given(configured=st.integers(1, 100_000), fd_limit=st.integers(64, 2_000_000))
def test_the_budget_is_the_most_that_fits(configured: int, fd_limit: int) -> None:
    budget = connection_budget(configured, fd_limit)
    if budget < configured:  # lowered: one more would not fit
        assert budget + 1 + lingering_slots(budget + 1) > fd_limit - min(FD_RESERVE, fd_limit // 2)


def test_a_generous_limit_leaves_the_configured_budget() -> None:
    assert connection_budget(2048, 1_048_576) == 2048
    assert connection_budget(2048, 1024) == 723  # 1,024 - 256 reserved = 768 = 723 + 45 lingering


class FakeConn:
    """Stands in for a protocol instance: the guard only calls ``displace`` on it."""

    def __init__(self, guard: ConnectionGuard, slot: Slot) -> None:
        self.guard = guard
        self.slot = Slot.GONE
        self.displaced = False
        self.set(slot)

    def set(self, slot: Slot) -> None:
        old, self.slot = self.slot, slot
        self.guard.move(self, old, slot)  # type: ignore[arg-type]

    def displace(self) -> None:
        self.displaced = True
        self.set(Slot.GONE)


def guard(max_connections: int) -> ConnectionGuard:
    return ConnectionGuard(ConnectionLimits(1.0, 1.0, 1.0, 4096, 20, max_connections))


def test_displacement_order_is_fresh_then_oldest_head_then_longest_idle_never_busy() -> None:
    g = guard(5)
    kept_a, head_a, busy, head_b, fresh = (
        FakeConn(g, s) for s in (Slot.KEPT, Slot.HEAD, Slot.BUSY, Slot.HEAD, Slot.FRESH)
    )
    conns: list[Any] = [kept_a, head_a, busy, head_b, fresh]
    order = []
    for _ in range(4):
        assert g.admit() is Admission.ACCEPT
        order.append(next(c for c in conns if c.displaced and c not in order))
        FakeConn(g, Slot.BUSY)  # the newcomer takes the freed slot with a request
    assert order == [fresh, head_a, head_b, kept_a]
    assert not busy.displaced
    # Every connection now carries a request: refuse, then (lingering slots used up) reset.
    for _ in range(lingering_slots(5)):
        assert g.admit() is Admission.REFUSE
        FakeConn(g, Slot.LINGERING)
    assert g.admit() is Admission.RESET
    assert g.num_serving == 5 and g.num_lingering == lingering_slots(5)


def test_a_kept_connection_used_again_moves_to_the_back_of_the_idle_order() -> None:
    g = guard(2)
    first, second = FakeConn(g, Slot.KEPT), FakeConn(g, Slot.KEPT)
    first.set(Slot.BUSY)
    first.set(Slot.KEPT)  # answered again: now the most recently idle
    assert g.admit() is Admission.ACCEPT
    assert second.displaced and not first.displaced


def test_draining_refuses_new_model_work_only() -> None:
    assert is_new_work("POST", "/v1/embeddings")
    assert is_new_work("POST", "/v1/infer")
    assert is_new_work("POST", "/v1/heads")
    assert is_new_work("POST", "/v1/heads/topics/retrain")
    assert not is_new_work("GET", "/v1/heads")
    assert not is_new_work("POST", "/v1/heads/topics/share")
    assert not is_new_work("GET", "/readyz")
    assert not is_new_work("POST", "/v1/admin/clients")


def test_a_wildcard_bind_address_is_shown_as_loopback() -> None:
    assert display_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert display_url("::", 8000) == "http://[::1]:8000"
    assert display_url("10.0.0.5", 80) == "http://10.0.0.5:80"


# -- the composition root ------------------------------------------------------------------------


class Part:
    """A part's lifecycle as ``Server.running`` drives it: records each call, may fail to start."""

    def __init__(self, name: str, calls: list[str], fail_start: bool = False) -> None:
        self.name, self.calls, self.fail_start = name, calls, fail_start

    async def start(self, warmup: bool = True) -> None:
        self.calls.append(f"{self.name} start" + ("" if warmup else " (no warmup)"))
        if self.fail_start:
            raise RuntimeError(f"{self.name} did not start")

    async def stop(self) -> None:
        self.calls.append(f"{self.name} stop")


def parts(calls: list[str], failing: str | None = None, warmup: bool = True) -> Server:
    tenancy, engine, heads = (Part(n, calls, fail_start=n == failing) for n in ("tenancy", "engine", "heads"))
    return Server(Settings(), Metrics(), engine, tenancy, heads, warmup)  # type: ignore[arg-type]


async def test_parts_start_in_dependency_order_and_stop_in_reverse_tenancy_last() -> None:
    """Tenancy stops last: the ledger's last flush comes after the engine finished what it accepted."""
    calls: list[str] = []
    async with parts(calls, warmup=False).running():
        assert calls == ["tenancy start", "engine start (no warmup)", "heads start"]
    assert calls[3:] == ["heads stop", "engine stop", "tenancy stop"]


@pytest.mark.parametrize(
    ("failing", "expected"),
    [
        ("tenancy", ["tenancy start"]),
        ("engine", ["tenancy start", "engine start", "tenancy stop"]),
        ("heads", ["tenancy start", "engine start", "heads start", "engine stop", "tenancy stop"]),
    ],
)
async def test_a_part_that_fails_to_start_stops_the_ones_started_before_it(failing: str, expected: list[str]) -> None:
    calls: list[str] = []
    with pytest.raises(RuntimeError, match=f"{failing} did not start"):
        async with parts(calls, failing).running():
            raise AssertionError("served although a part failed to start")
    assert calls == expected


def dummy_settings(tmp_path: Path) -> Settings:
    return Settings(
        models=(ModelConfig(name="minilm", version="1", backend="dummy", dim=8),),
        tenancy=TenancyConfig(
            database_url=f"sqlite:///{tmp_path}/polyray.db", spool_path=str(tmp_path / "usage-spool.jsonl")
        ),
    )


async def test_build_server_wires_tenancy_engine_heads_and_app_and_the_ledger_flushes_on_stop(tmp_path: Path) -> None:
    made: list[BootstrapKeys] = []
    server = build_server(dummy_settings(tmp_path), warmup=False, on_keys=made.append)
    (keys,) = made
    assert server.tenancy is not None and server.tenancy.bootstrap_keys == keys
    assert server.heads is not None and server.heads.dims == {ModelRef("minilm", "1"): 8}
    state = server.app.state.polyray
    assert (state.engine, state.tenancy, state.heads, state.metrics) == (
        server.engine,
        server.tenancy,
        server.heads,
        server.metrics,
    )
    async with server.running():
        result = await server.engine.embed(EmbedRequest("minilm", ("hello", "world"), client=keys.client))
        assert result.vectors.shape == (2, 8)
    # Stopped: the ledger wrote its last batch to the database, read back by a fresh open.
    reopened = build_server(dummy_settings(tmp_path), warmup=False)
    assert reopened.tenancy is not None
    totals = usage_totals(reopened.tenancy.db, since=datetime(2000, 1, 1, tzinfo=UTC))
    reopened.tenancy.db.dispose()
    assert [(t.group, t.num_texts) for t in totals] == [(keys.client, 2)]


def test_build_server_without_tenancy_is_the_engine_alone(tmp_path: Path) -> None:
    server = build_server(dummy_settings(tmp_path), tenancy=False)
    assert server.tenancy is None and server.heads is None
    assert not (tmp_path / "polyray.db").exists()  # no client database opened

"""The pure parts of ``polyray.server``: the connection budget under a descriptor limit, the
displacement order of the connection guard, and which requests a draining server refuses."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from polyray.server import (
    FD_RESERVE,
    Admission,
    ConnectionGuard,
    ConnectionLimits,
    Slot,
    connection_budget,
    display_url,
    is_new_work,
    lingering_slots,
)


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

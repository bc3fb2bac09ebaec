"""Properties of the start-time fair queue (``scheduler.FairQueue``), checked with hypothesis.

The queue is pure (no clock, no I/O), so every property is checked against a plain model of what
should be in it: nothing lost or duplicated, each client's items in arrival order, the head's
start tags never going backwards, SFQ's fairness bound between backlogged clients, and no credit
for a client that was idle.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from polyray.engine.scheduler import FairQueue, Tagged

CLIENTS = ("a", "b", "c", "d")
WEIGHTS = st.sampled_from([0.25, 0.5, 1.0, 1.5, 4.0, 10.0])
COSTS = st.integers(min_value=0, max_value=300)
POSITIVE_COSTS = st.integers(min_value=1, max_value=300)


def ordered(queue: FairQueue[int]) -> list[Tagged[int]]:
    return list(queue)


# -- conservation, order and bookkeeping under any sequence of operations ----------------------


class FairQueueMachine(RuleBasedStateMachine):
    """Random push / take / remove_if / drain against a model of the queue's contents."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: FairQueue[int] = FairQueue()
        self.weights: dict[str, float] = {}
        self.next_item = 0
        self.waiting: dict[int, str] = {}  # item -> client, what the queue must hold
        self.pushed_order: dict[str, list[int]] = defaultdict(list)
        self.out: Counter[int] = Counter()  # every item that left, by any route
        self.last_head_start = float("-inf")
        self.only_head_taken = True

    @rule(client=st.sampled_from(CLIENTS), cost=COSTS, weight=WEIGHTS)
    def push(self, client: str, cost: int, weight: float) -> None:
        # A client's weight is fixed while it has items waiting (the engine reads it per request).
        weight = self.weights.setdefault(client, weight)
        virtual_before = self.queue.virtual
        item = self.next_item
        self.next_item += 1
        tagged = self.queue.push(client, item, cost, weight)
        assert tagged.start >= virtual_before  # never a tag behind the virtual time
        assert tagged.finish == pytest.approx(tagged.start + cost / weight)
        assert tagged.client == client and tagged.item == item and tagged.cost_tokens == cost
        self.waiting[item] = client
        self.pushed_order[client].append(item)

    @precondition(lambda self: len(self.queue) > 0)
    @rule()
    def take_head(self) -> None:
        head_start = self.queue[0].start
        (taken,) = self.queue.take([0])
        assert taken.start == head_start
        if self.only_head_taken:
            assert taken.start >= self.last_head_start
        self.last_head_start = taken.start
        self._left([taken])

    @precondition(lambda self: len(self.queue) > 0)
    @rule(data=st.data())
    def take_some(self, data: st.DataObject) -> None:
        indices = data.draw(
            st.lists(st.integers(min_value=0, max_value=len(self.queue) - 1), min_size=1, max_size=6, unique=True)
        )
        expected = [self.queue[i].item for i in sorted(indices)]
        earliest_start = self.queue[min(indices)].start
        virtual_before = self.queue.virtual
        taken = self.queue.take(indices)
        assert [t.item for t in taken] == expected
        # Virtual time follows the earliest item taken (the one "in service"), never goes back.
        assert self.queue.virtual == max(virtual_before, earliest_start)
        if indices != [0]:
            self.only_head_taken = False
        self._left(taken)

    @rule(modulus=st.integers(min_value=2, max_value=5), residue=st.integers(min_value=0, max_value=4))
    def remove_if(self, modulus: int, residue: int) -> None:
        def dead(item: int) -> bool:
            return item % modulus == residue % modulus

        expected = [t.item for t in self.queue if dead(t.item)]
        virtual_before = self.queue.virtual
        gone = self.queue.remove_if(dead)
        assert [t.item for t in gone] == expected  # in queue order
        assert self.queue.virtual == virtual_before  # dropping dead entries serves nobody
        self._left(gone)

    @rule()
    def drain(self) -> None:
        expected = [t.item for t in self.queue]
        items = self.queue.drain()
        assert [t.item for t in items] == expected
        self._left(items)

    def _left(self, removed: list[Tagged[int]]) -> None:
        for tagged in removed:
            assert tagged.item in self.waiting, f"item {tagged.item} left twice or was never queued"
            assert self.waiting.pop(tagged.item) == tagged.client
            self.out[tagged.item] += 1

    @invariant()
    def nothing_lost_or_duplicated(self) -> None:
        inside = [t.item for t in self.queue]
        assert len(inside) == len(set(inside)) == len(self.queue)
        assert set(inside) == set(self.waiting)
        assert all(n == 1 for n in self.out.values())
        assert set(inside).isdisjoint(self.out)
        assert len(inside) + len(self.out) == self.next_item

    @invariant()
    def sorted_by_start_tag_then_arrival(self) -> None:
        keys = [(t.start, t.seq) for t in self.queue]
        assert keys == sorted(keys)

    @invariant()
    def per_client_fifo(self) -> None:
        for client in CLIENTS:
            mine = [t.item for t in self.queue if t.client == client]
            arrival = [i for i in self.pushed_order[client] if i in self.waiting]
            assert mine == arrival

    @invariant()
    def num_waiting_per_client(self) -> None:
        counts = Counter(self.waiting.values())
        for client in CLIENTS:
            assert self.queue.num_waiting(client) == counts[client]
        assert self.queue.num_waiting("never-seen") == 0


TestFairQueueMachine = FairQueueMachine.TestCase
TestFairQueueMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


# -- the head's start tags never go backwards -------------------------------------------------


@given(
    ops=st.lists(
        st.one_of(st.tuples(st.sampled_from(CLIENTS), POSITIVE_COSTS, WEIGHTS), st.just(None)),
        min_size=1,
        max_size=120,
    )
)
def test_start_tags_taken_from_the_head_never_decrease(ops: list[tuple[str, int, float] | None]) -> None:
    queue: FairQueue[int] = FairQueue()
    weights: dict[str, float] = {}
    served: list[float] = []
    for n, op in enumerate(ops):
        if op is None:
            if len(queue):
                served.extend(t.start for t in queue.take([0]))
        else:
            client, cost, weight = op
            queue.push(client, n, cost, weights.setdefault(client, weight))
    while len(queue):
        served.extend(t.start for t in queue.take([0]))
    assert served == sorted(served)


# -- SFQ's fairness bound ----------------------------------------------------------------------


@st.composite
def backlogged_clients(draw: st.DrawFn) -> tuple[dict[str, float], dict[str, list[int]]]:
    """2-4 clients with weights and a long list of item costs each (enough to stay backlogged)."""
    k = draw(st.integers(min_value=2, max_value=4))
    names = CLIENTS[:k]
    weights = {c: draw(WEIGHTS) for c in names}
    costs = {c: draw(st.lists(POSITIVE_COSTS, min_size=30, max_size=60)) for c in names}
    return weights, costs


@settings(max_examples=100, deadline=None)
@given(
    setup=backlogged_clients(),
    initial=st.integers(min_value=1, max_value=5),
    rnd=st.randoms(use_true_random=False),
)
def test_backlogged_clients_are_served_within_the_sfq_bound(
    setup: tuple[dict[str, float], dict[str, list[int]]], initial: int, rnd: random.Random
) -> None:
    """Served one item at a time from the head, with each client's items arriving in bursts while it
    stays backlogged, over every interval in which all clients are backlogged:
    |W_i/w_i − W_j/w_j| ≤ max_cost_i/w_i + max_cost_j/w_j."""
    weights, costs = setup
    queue: FairQueue[int] = FairQueue()
    feed = {c: iter(enumerate(cs)) for c, cs in costs.items()}
    max_cost = {c: max(cs) for c, cs in costs.items()}
    exhausted: set[str] = set()

    def push_next(client: str) -> None:
        nxt = next(feed[client], None)
        if nxt is None:
            exhausted.add(client)
        else:
            queue.push(client, nxt[0], nxt[1], weights[client])

    for client in weights:
        for _ in range(initial):
            push_next(client)
    # served[t][c]: tokens served to c after t dispatches, recorded while all clients are backlogged.
    totals = dict.fromkeys(weights, 0)
    served = [dict(totals)]
    while not exhausted:
        (taken,) = queue.take([0])
        totals[taken.client] += taken.cost_tokens
        # Arrivals: the client just served always gets its next item if it ran dry (it stays
        # backlogged); anyone may get a burst of more.
        if queue.num_waiting(taken.client) == 0:
            push_next(taken.client)
        for client in weights:
            for _ in range(rnd.choice((0, 0, 1, 2))):
                push_next(client)
        if exhausted or any(queue.num_waiting(c) == 0 for c in weights):
            break
        served.append(dict(totals))
    assert len(served) > 10
    for i, j in itertools.combinations(weights, 2):
        bound = max_cost[i] / weights[i] + max_cost[j] / weights[j]
        # Over [t1, t2] the gap is lag(t2) − lag(t1), so the worst interval is max(lag) − min(lag).
        lag = [s[i] / weights[i] - s[j] / weights[j] for s in served]
        assert max(lag) - min(lag) <= bound + 1e-9, (i, j, weights, max_cost, lag)


def test_weights_split_service_in_proportion() -> None:
    """A concrete case of the bound: weight 3 against weight 1, equal item costs, both flooding."""
    queue: FairQueue[str] = FairQueue()
    for n in range(300):
        queue.push("heavy", f"h{n}", 10, 3.0)
        queue.push("light", f"l{n}", 10, 1.0)
    first = [queue.take([0])[0].client for _ in range(200)]
    assert abs(first.count("heavy") - 150) <= 2
    assert abs(first.count("light") - 50) <= 2


def test_flooding_client_only_pushes_its_own_tags_back() -> None:
    queue: FairQueue[str] = FairQueue()
    for n in range(100):
        queue.push("flood", f"f{n}", 50, 1.0)
    late = queue.push("polite", "p0", 50, 1.0)
    # Arriving after 100 flood items, the polite client's one item is second in line.
    assert [t.item for t in queue][:2] == ["f0", "p0"]
    assert late.start == 0.0


# -- idle clients get no credit ----------------------------------------------------------------


@given(
    busy_costs=st.lists(POSITIVE_COSTS, min_size=2, max_size=40),
    num_served=st.integers(min_value=1, max_value=40),
    idle_cost=POSITIVE_COSTS,
    weight=WEIGHTS,
)
def test_client_returning_from_idle_starts_at_virtual_time(
    busy_costs: list[int], num_served: int, idle_cost: int, weight: float
) -> None:
    queue: FairQueue[str] = FairQueue()
    # The returning client was served once long ago, then went quiet.
    queue.push("idle", "early", idle_cost, weight)
    queue.take([0])
    for n, cost in enumerate(busy_costs):
        queue.push("busy", f"b{n}", cost, 1.0)
    for _ in range(min(num_served, len(busy_costs) - 1)):
        queue.take([0])
    virtual = queue.virtual
    back = queue.push("idle", "back", idle_cost, weight)
    assert back.start >= virtual
    # No credit: its tag is the virtual time, not its old finish (which lies behind).
    assert back.start == max(virtual, idle_cost / weight)


def test_idle_client_cannot_bank_service() -> None:
    """A client idle while another was served does not then get a run of the server to catch up."""
    queue: FairQueue[str] = FairQueue()
    for n in range(50):
        queue.push("busy", f"b{n}", 10, 1.0)
    for _ in range(40):
        queue.take([0])
    for n in range(20):
        queue.push("returning", f"r{n}", 10, 1.0)
    order = [queue.take([0])[0].client for _ in range(20)]
    # Alternating service from here on, not 20 in a row for the returning client.
    assert order.count("returning") <= 11
    assert order.count("busy") >= 9


def test_history_of_a_flooder_survives_the_queue_emptying() -> None:
    """Removing a flooder's dead entries empties the queue; its finish tag, still ahead of virtual
    time, is kept, so when it comes back it is still behind a newcomer."""
    queue: FairQueue[str] = FairQueue()
    for n in range(10):
        queue.push("flood", f"f{n}", 100, 1.0)
    queue.take([0])
    queue.remove_if(lambda item: True)
    assert len(queue) == 0 and queue.num_waiting("flood") == 0
    newcomer = queue.push("new", "n0", 100, 1.0)
    again = queue.push("flood", "f-again", 100, 1.0)
    assert newcomer.start == queue.virtual == 0.0
    assert again.start == 1000.0
    assert [t.item for t in queue] == ["n0", "f-again"]


# -- plain behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0.0, -1.0])
def test_non_positive_weight_is_refused(weight: float) -> None:
    queue: FairQueue[str] = FairQueue()
    with pytest.raises(ValueError, match="weight"):
        queue.push("a", "x", 1, weight)
    assert len(queue) == 0 and queue.num_waiting("a") == 0


def test_ties_go_to_the_earlier_arrival() -> None:
    queue: FairQueue[str] = FairQueue()
    for client in ("c", "a", "b"):
        queue.push(client, client, 5, 1.0)
    assert [t.item for t in queue] == ["c", "a", "b"]
    assert [t.start for t in queue] == [0.0, 0.0, 0.0]


def test_drain_empties_and_resets_counts() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "a0", 5, 1.0)
    queue.push("b", "b0", 5, 2.0)
    assert [t.item for t in queue.drain()] == ["a0", "b0"]
    assert len(queue) == 0
    assert queue.num_waiting("a") == queue.num_waiting("b") == 0


def test_promote_moves_a_deep_item_to_the_joining_clients_place() -> None:
    queue: FairQueue[str] = FairQueue()
    items = [f"a{i}" for i in range(50)]  # promote finds the queued object itself (identity)
    for item in items:
        queue.push("flood", item, 10, 1.0)
    assert queue.promote(items[40], "steady", 10, 1.0)  # the steady client has no backlog: start tag 0
    order = [t.item for t in queue]
    assert order[:2] == ["a0", "a40"]
    assert sorted(order) == sorted(f"a{i}" for i in range(50))  # nothing lost or duplicated
    assert (queue.num_waiting("flood"), queue.num_waiting("steady")) == (49, 1)
    # The steady client's next push queues behind the item it promoted (its finish tag moved on).
    queue.push("steady", "s1", 10, 1.0)
    assert [t.item for t in queue].index("s1") > order.index("a40")
    # Promoting for a client whose place is no better leaves the queue as it was.
    before = [t.item for t in queue]
    assert not queue.promote(items[1], "flood", 10, 1.0)
    assert [t.item for t in queue] == before
    assert not queue.promote("not queued", "steady", 10, 1.0)

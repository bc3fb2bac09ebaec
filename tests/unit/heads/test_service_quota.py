"""Training jobs and their owners' quotas: one owner out of quota fails its own job, never the queue.

The real pieces, no model: tenancy on a SQLite file (clients, keys, the usage ledger whose today's
compute seeds the daily budget at open), the engine on ``DummyBackend`` charging every request to
the owner, the head store on the same database and ``HeadService``'s single training queue.
Each wait on the service is bounded (``JOB_LIMIT_S``, generous): before the fix, an owner out of
``daily_compute_s`` held the queue until the next UTC day, so these tests would fail at the bound
instead of hanging.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from polyray.backends.dummy import DummyBackend
from polyray.config import ServerConfig, TenancyConfig
from polyray.db.connection import open_database
from polyray.engine.engine import Engine
from polyray.heads.datasets import load_topics
from polyray.heads.kinds import HeadSpec, HeadStatus
from polyray.heads.service import TRAIN_CHUNK_TEXTS, HeadService
from polyray.heads.store import HeadStore
from polyray.policies import BatchPolicy
from polyray.tenancy.ledger import UsageBatch, UsageRow, apply_batch
from polyray.tenancy.model import Quota
from polyray.tenancy.reports import usage_totals
from polyray.tenancy.service import Tenancy
from polyray.tenancy.store import ClientStore
from polyray.types import ModelRef

REF = ModelRef("minilm", "1")
JOB_LIMIT_S = 60.0  # every queued job ends well within this (a DummyBackend job takes well under a second)
# 120 examples (every third of the shipped topics set, all six topics): two embedding requests per job.
EXAMPLES = load_topics()[::3]
assert len(EXAMPLES) > TRAIN_CHUNK_TEXTS


@dataclass
class Server:
    tenancy: Tenancy
    engine: Engine
    heads: HeadService
    store: HeadStore

    async def train(self, owner: str, name: str) -> HeadSpec:
        return await self.heads.create(owner, name, "classifier", "minilm", EXAMPLES)

    async def settle(self) -> None:
        await asyncio.wait_for(self.heads.wait_idle(), JOB_LIMIT_S)

    def head(self, spec: HeadSpec) -> HeadSpec:
        return self.store.get(spec.head_id)


async def open_server(
    tmp_path: Path, quotas: Mapping[str, Quota], compute_s_today: Mapping[str, float], max_quota_wait_s: float
) -> Server:
    """A database with these clients and today's charged compute, and the server parts on it."""
    url = f"sqlite:///{tmp_path}/polyray.db"
    db = open_database(url)
    store = ClientStore(db)
    for name, quota in quotas.items():
        store.create_client(name, quota=quota)
    minute_s = int(time.time() // 60) * 60
    rows = tuple(
        UsageRow(client, REF.name, REF.version, minute_s, compute_ns=int(s * 1e9))
        for client, s in compute_s_today.items()
    )
    apply_batch(db, UsageBatch("earlier-today", rows))
    db.dispose()
    config = TenancyConfig(database_url=url, bootstrap=False, spool_path=str(tmp_path / "spool.jsonl"))
    tenancy = Tenancy.open(config)
    await tenancy.start()
    backend = DummyBackend(dim=32)
    engine = Engine({REF: backend}, BatchPolicy(max_wait_ms=1.0), ServerConfig(), accounts=tenancy.accounts)
    await engine.start(warmup=False)
    heads_store = HeadStore(tenancy.db)
    service = HeadService(
        heads_store, engine, tenancy.accounts, dims={REF: backend.dim}, max_quota_wait_s=max_quota_wait_s
    )
    await service.start()
    return Server(tenancy, engine, service, heads_store)


@pytest.fixture
async def servers() -> AsyncIterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        await server.heads.stop()
        await server.engine.stop()
        await server.tenancy.stop()


async def test_an_owner_out_of_daily_compute_fails_its_job_and_the_next_job_completes(
    tmp_path: Path, servers: list[Server]
) -> None:
    server = await open_server(
        tmp_path,
        {"spent": Quota(daily_compute_s=2.0), "fresh": Quota(daily_compute_s=2.0)},
        {"spent": 2.5},  # more than its budget, charged earlier today (the ledger seeds the tracker)
        max_quota_wait_s=600.0,  # a wait bound that must not matter: the daily budget fails at once
    )
    servers.append(server)
    blocked = await server.train("spent", "topics")  # queued first
    other = await server.train("fresh", "topics")
    await server.settle()

    failed = server.head(blocked)
    assert failed.status is HeadStatus.FAILED
    assert failed.error is not None
    assert failed.error.startswith("quota_exhausted (daily_compute_s): ")
    assert "daily_compute_s=2 " in failed.error and "00:00 UTC" in failed.error  # the limit and when it resets
    done = server.head(other)
    assert done.status is HeadStatus.READY and done.error is None
    assert done.metrics["num_train"] + done.metrics["num_validation"] == len(EXAMPLES)
    # Training embeds as the owner: the refused one had no request answered, the other all of its texts.
    await server.tenancy.ledger.flush()
    today = datetime.fromtimestamp(int(time.time() // 86_400) * 86_400, UTC)
    totals = {t.group: t for t in usage_totals(server.tenancy.db, today, by="client")}
    assert totals["spent"].num_requests == 0 and totals["spent"].num_texts == 0
    assert totals["fresh"].num_texts == len(EXAMPLES) and totals["fresh"].compute_s > 0


async def test_a_short_limit_is_waited_out_within_the_bound(tmp_path: Path, servers: list[Server]) -> None:
    # One request per second: the job's second embedding request waits about a second, then passes.
    server = await open_server(tmp_path, {"slow": Quota(requests_per_s=1.0)}, {}, max_quota_wait_s=30.0)
    servers.append(server)
    spec = await server.train("slow", "topics")
    await server.settle()
    assert server.head(spec).status is HeadStatus.READY


async def test_a_short_limit_past_the_bound_fails_the_job_and_retrain_queues_it_again(
    tmp_path: Path, servers: list[Server]
) -> None:
    server = await open_server(
        tmp_path, {"slow": Quota(requests_per_s=0.05), "other": Quota()}, {}, max_quota_wait_s=1.0
    )  # the second request would wait 20 s
    servers.append(server)
    slow = await server.train("slow", "topics")
    other = await server.train("other", "topics")
    await server.settle()
    failed = server.head(slow)
    assert failed.status is HeadStatus.FAILED
    assert failed.error is not None and failed.error.startswith("quota_exhausted (requests_per_s): ")
    assert f"after embedding {TRAIN_CHUNK_TEXTS} of {len(EXAMPLES)} examples" in (failed.error or "")
    assert server.head(other).status is HeadStatus.READY

    # The owner's limit is raised; retraining the failed head on its own version queues it again.
    server.tenancy.store.update("slow", quota=Quota())
    await server.tenancy.directory.refresh()
    again = await server.heads.retrain("slow", "topics", "minilm")
    assert again.head_id == slow.head_id and again.status is HeadStatus.PENDING and again.error is None
    await server.settle()
    assert server.head(slow).status is HeadStatus.READY

"""Clients, keys and the usage ledger on real SQLite files (``db.connection``, ``tenancy.store/directory/ledger/reports``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

from polyray.config import TenancyConfig
from polyray.db.connection import MIGRATIONS_DIR, Database, normalize_url, open_database, schema_version
from polyray.db.schema import api_keys, clients, metadata, usage, usage_batches
from polyray.errors import Forbidden, InvalidRequest, NotFound, RateLimited, Unauthenticated
from polyray.tenancy.directory import ClientDirectory
from polyray.tenancy.keys import ADMIN_ROLE, CLIENT_ROLE, generate_key, hash_key
from polyray.tenancy.ledger import (
    Spool,
    UsageAggregator,
    UsageBatch,
    UsageLedger,
    UsageRow,
    apply_batch,
    compute_s_today,
)
from polyray.tenancy.model import PriorityClass, Quota
from polyray.tenancy.reports import usage_totals
from polyray.tenancy.service import FIRST_CLIENT, Tenancy
from polyray.tenancy.store import ClientStore
from polyray.types import UsageRecord

T0 = datetime(2026, 1, 5, 10, 30, 15, tzinfo=UTC).timestamp()
DAY_START = datetime(2026, 1, 5, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    db = open_database(f"sqlite:///{tmp_path}/ledger.db")
    yield db
    db.dispose()


@pytest.fixture
def store(db: Database) -> ClientStore:
    return ClientStore(db)


def totals_by_client(db: Database) -> dict[str, tuple[int, int, int, int, int]]:
    """(requests, texts, cached, tokens, compute_ns) per client, read straight from the table."""
    cols = [usage.c.num_requests, usage.c.num_texts, usage.c.num_cached, usage.c.num_tokens, usage.c.compute_ns]
    query = sa.select(usage.c.client, *(sa.func.sum(c) for c in cols)).group_by(usage.c.client)
    with db.connect() as conn:
        return {r[0]: tuple(int(v) for v in r[1:]) for r in conn.execute(query)}  # type: ignore[misc]


def expected_totals(records: list[UsageRecord]) -> dict[str, tuple[int, int, int, int, int]]:
    sums: dict[str, list[int]] = {}
    for r in records:
        acc = sums.setdefault(r.client, [0, 0, 0, 0, 0])
        for i, v in enumerate((r.num_requests, r.num_texts, r.num_cached, r.num_tokens, r.compute_ns)):
            acc[i] += v
    return {c: tuple(v) for c, v in sums.items()}  # type: ignore[misc]


def record(client: str, at: float = T0, model: str = "minilm", version: str = "1", **counts: int) -> UsageRecord:
    return UsageRecord(client, model, version, at, **counts)


# -- schema ------------------------------------------------------------------------------------


def test_new_database_migrates_to_head(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "polyray.db"  # parent directories are created
    db = open_database(f"sqlite:///{path}")
    try:
        assert path.exists()
        assert schema_version(db) == "0002"
        names = set(sa.inspect(db).get_table_names())
        assert {"clients", "api_keys", "usage_minutes", "usage_batches", "alembic_version"} <= names
    finally:
        db.dispose()
    # Opening again is a no-op upgrade and keeps the data.
    again = open_database(f"sqlite:///{path}")
    try:
        assert schema_version(again) == "0002"
    finally:
        again.dispose()


def test_schema_version_of_an_empty_database(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path}/raw.db", upgrade=False)
    try:
        assert schema_version(db) is None
    finally:
        db.dispose()


def test_a_database_of_revision_0001_upgrades_in_place_keeping_its_rows(tmp_path: Path) -> None:
    """The migrations moved to ``polyray.db``; the revision ids and the ``alembic_version`` table did
    not, so a database an older polyray left at 0001 (tenancy tables only) upgrades to 0002 unchanged."""
    url = f"sqlite:///{tmp_path}/old.db"
    db = open_database(url, upgrade=False)
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with db.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
        assert schema_version(db) == "0001"
        _, key = ClientStore(db).create_client("team", quota=Quota(daily_compute_s=2.0))
        assert "heads" not in sa.inspect(db).get_table_names()
    finally:
        db.dispose()
    db = open_database(url)
    try:
        assert schema_version(db) == "0002"
        with db.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
        assert {"heads", "head_shares", "head_examples", "head_generation"} <= set(sa.inspect(db).get_table_names())
        team = ClientStore(db).get("team")
        assert team.quota.daily_compute_s == 2.0
        assert ClientStore(db).snapshot().keys[hash_key(key)] == (CLIENT_ROLE, "team")
    finally:
        db.dispose()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()  # the package data pyproject.toml ships


def test_schema_module_matches_the_migrated_tables(db: Database) -> None:
    inspector = sa.inspect(db)
    for table in metadata.sorted_tables:
        migrated = {c["name"]: c for c in inspector.get_columns(table.name)}
        assert set(migrated) == {c.name for c in table.columns}, table.name
        for column in table.columns:
            got = migrated[column.name]
            assert got["type"].compile(db.dialect) == column.type.compile(db.dialect), (table.name, column.name)
            assert got["nullable"] == column.nullable, (table.name, column.name)
        pk = inspector.get_pk_constraint(table.name)["constrained_columns"]
        assert sorted(pk) == sorted(c.name for c in table.primary_key.columns), table.name
    fks = inspector.get_foreign_keys("api_keys")
    assert [(fk["constrained_columns"], fk["referred_table"]) for fk in fks] == [(["client_id"], "clients")]
    # And Alembic's own comparison finds nothing to migrate.
    with db.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diffs == []


def test_normalize_url() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


# -- keys --------------------------------------------------------------------------------------


def test_generated_keys_are_random_prefixed_and_hashed() -> None:
    key, prefix = generate_key(CLIENT_ROLE)
    other, _ = generate_key(CLIENT_ROLE)
    admin, admin_prefix = generate_key(ADMIN_ROLE)
    assert key != other
    assert key.startswith(prefix + "_") and prefix.startswith("pk-c") and len(prefix) == len("pk-c") + 8
    assert admin_prefix.startswith("pk-a") and admin.startswith(admin_prefix)
    assert len(key) > 50
    assert hash_key(key) != hash_key(other)
    # Stored digests are SHA-256 hex: pinned to the standard's test vector, because a changed
    # hash would lock out every key already in a database.
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# -- clients -----------------------------------------------------------------------------------


def test_create_get_list(store: ClientStore) -> None:
    quota = Quota(requests_per_s=5.0, tokens_per_s=1000.0, max_concurrent=3, daily_compute_s=60.0)
    made, key = store.create_client("search-api", PriorityClass.INTERACTIVE, 2.0, quota)
    assert key.startswith("pk-c")
    assert made.name == "search-api" and made.priority is PriorityClass.INTERACTIVE and made.share == 2.0
    assert made.weight == 8.0  # share × interactive class weight
    assert store.get("search-api") == made
    store.create_client("bulk")
    assert [c.name for c in store.all()] == ["bulk", "search-api"]
    bulk = store.get("bulk")
    assert bulk.priority is PriorityClass.BATCH and bulk.share == 1.0 and bulk.quota == Quota()
    assert not bulk.disabled
    with pytest.raises(NotFound) as info:
        store.get("absent")
    assert info.value.code == "client_not_found"


@pytest.mark.parametrize("name", ["", "Upper", "-lead", "has space", "a" * 64, "ünï", "x/y"])
def test_invalid_names_are_refused(store: ClientStore, name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        store.create_client(name)
    assert info.value.param == "name"
    assert store.all() == []


def test_duplicate_name_and_bad_share_are_refused(store: ClientStore) -> None:
    store.create_client("team")
    with pytest.raises(InvalidRequest) as info:
        store.create_client("team")
    assert info.value.code == "client_exists"
    with pytest.raises(InvalidRequest):
        store.create_client("other", share=0.0)
    with pytest.raises(InvalidRequest):
        store.update("team", share=-1.0)
    assert [c.name for c in store.all()] == ["team"]


def test_update_changes_only_what_is_given(store: ClientStore) -> None:
    store.create_client("team", quota=Quota(requests_per_s=1.0))
    updated = store.update("team", quota=Quota(tokens_per_s=50.0), priority=PriorityClass.INTERACTIVE)
    assert updated.quota == Quota(tokens_per_s=50.0)
    assert updated.priority is PriorityClass.INTERACTIVE and updated.share == 1.0
    assert store.get("team") == updated
    store.update("team", share=3.0)
    again = store.get("team")
    assert again.share == 3.0 and again.quota == Quota(tokens_per_s=50.0)
    with pytest.raises(NotFound):
        store.update("absent", share=2.0)


def test_directory_authenticates_disables_and_rotates(store: ClientStore) -> None:
    _, key = store.create_client("team")
    admin_key = store.create_admin_key()
    directory = ClientDirectory(store)
    directory.load()

    who = directory.authenticate(key)
    assert who.role == CLIENT_ROLE and not who.is_admin
    assert who.client is not None and who.client.name == "team"
    admin = directory.authenticate(admin_key)
    assert admin.is_admin and admin.client is None
    assert directory.client("team") == store.get("team")
    assert directory.client("absent") is None

    with pytest.raises(Unauthenticated) as missing:
        directory.authenticate(None)
    assert missing.value.code == "missing_api_key"
    with pytest.raises(Unauthenticated) as wrong:
        directory.authenticate(key + "x")
    assert wrong.value.code == "invalid_api_key"

    store.update("team", disabled=True)
    directory.authenticate(key)  # the snapshot is not refreshed yet
    directory.load()
    with pytest.raises(Forbidden) as disabled:
        directory.authenticate(key)
    assert disabled.value.code == "client_disabled"
    store.update("team", disabled=False)
    directory.load()
    assert directory.authenticate(key).client is not None

    new_key = store.rotate_key("team")
    assert new_key != key
    directory.load()
    with pytest.raises(Unauthenticated):
        directory.authenticate(key)
    assert directory.authenticate(new_key).client is not None
    keys = store.keys("team")
    assert [k.revoked_at is not None for k in keys] == [True, False]
    assert all(k.role == CLIENT_ROLE and k.client == "team" for k in keys)
    assert new_key.startswith(keys[1].prefix)


async def test_directory_refresh_picks_up_changes_in_the_background(store: ClientStore) -> None:
    _, key = store.create_client("team")
    directory = ClientDirectory(store, refresh_interval_s=0.01)
    await directory.start()
    try:
        assert directory.authenticate(key).client is not None
        store.update("team", disabled=True)
        deadline = time.monotonic() + 5
        while True:
            try:
                directory.authenticate(key)
            except Forbidden:
                break
            assert time.monotonic() < deadline, "the directory never saw the change"
            await asyncio.sleep(0.01)
    finally:
        await directory.stop()


def test_keys_are_stored_only_hashed(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    db = open_database(f"sqlite:///{path}")
    store = ClientStore(db)
    _, key = store.create_client("team")
    rotated = store.rotate_key("team")
    admin = store.create_admin_key()
    with db.connect() as conn:
        digests = {r.key_sha256 for r in conn.execute(sa.select(api_keys))}
    db.dispose()
    raw = path.read_bytes()
    for secret in (key, rotated, admin):
        assert hash_key(secret) in digests
        assert secret.encode() not in raw
        assert secret.split("_", 1)[1].encode() not in raw  # not even the secret part alone
    for wal in tmp_path.glob("keys.db-*"):
        assert all(s.encode() not in wal.read_bytes() for s in (key, rotated, admin))


def test_is_empty_and_admin_keys(store: ClientStore) -> None:
    assert store.is_empty()
    store.create_admin_key()
    assert not store.is_empty()
    snapshot = store.snapshot()
    assert list(snapshot.keys.values()) == [(ADMIN_ROLE, None)]
    assert snapshot.clients == {}


def test_nothing_is_lost_across_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/reopen.db"
    db = open_database(url)
    _, key = ClientStore(db).create_client("team", quota=Quota(max_concurrent=2))
    apply_batch(db, UsageBatch("b1", (UsageRow("team", "minilm", "1", 60, 1, 2, 0, 30, 999),)))
    db.dispose()
    db = open_database(url)
    try:
        directory = ClientDirectory(ClientStore(db))
        directory.load()
        who = directory.authenticate(key)
        assert who.client is not None and who.client.quota == Quota(max_concurrent=2)
        assert totals_by_client(db) == {"team": (1, 2, 0, 30, 999)}
    finally:
        db.dispose()


# -- bootstrap (what `polyray serve` does on an empty database) --------------------------------


def test_tenancy_bootstraps_an_empty_database_once(tmp_path: Path) -> None:
    config = TenancyConfig(database_url=f"sqlite:///{tmp_path}/t.db", spool_path=str(tmp_path / "spool.jsonl"))
    first = Tenancy.open(config)
    try:
        keys = first.bootstrap_keys
        assert keys is not None and keys.client == FIRST_CLIENT
        who = first.directory.authenticate(keys.client_key)
        assert who.client is not None and who.client.name == FIRST_CLIENT
        assert who.client.priority is PriorityClass.INTERACTIVE
        assert first.directory.authenticate(keys.admin_key).is_admin
    finally:
        first.db.dispose()
    second = Tenancy.open(config)
    try:
        assert second.bootstrap_keys is None
        assert [c.name for c in second.store.all()] == [FIRST_CLIENT]
    finally:
        second.db.dispose()


def test_no_bootstrap_without_keys_auth(tmp_path: Path) -> None:
    config = TenancyConfig(database_url=f"sqlite:///{tmp_path}/t.db", auth="none")
    tenancy = Tenancy.open(config)
    try:
        assert tenancy.bootstrap_keys is None and not tenancy.auth_required
        assert tenancy.store.is_empty()
    finally:
        tenancy.db.dispose()


def test_tenancy_seeds_the_daily_budget_from_the_ledger(tmp_path: Path) -> None:
    config = TenancyConfig(database_url=f"sqlite:///{tmp_path}/t.db", bootstrap=False)
    db = open_database(config.database_url or "")
    ClientStore(db).create_client("team", quota=Quota(daily_compute_s=2.0))
    minute = int(time.time() // 60) * 60
    apply_batch(db, UsageBatch("today", (UsageRow("team", "minilm", "1", minute, compute_ns=2_500_000_000),)))
    db.dispose()
    tenancy = Tenancy.open(config)
    try:
        team = tenancy.accounts.client("team")
        with pytest.raises(RateLimited) as info:
            tenancy.accounts.quotas.admit(team, 0.0, time.time())
        assert info.value.code == "daily_compute_s"
    finally:
        tenancy.db.dispose()


# -- aggregation and exactly-once batches ------------------------------------------------------


def test_aggregator_sums_per_client_model_version_minute() -> None:
    agg = UsageAggregator()
    agg.record(record("a", T0, num_requests=1, num_tokens=10, compute_ns=100))
    agg.record(record("a", T0 + 20, compute_ns=50))  # same minute (10:30)
    agg.record(record("a", T0 + 50, compute_ns=7))  # next minute
    agg.record(record("a", T0, version="2", compute_ns=1))
    agg.record(record("b", T0, num_requests=2, num_texts=3, num_cached=1, num_tokens=4, compute_ns=5))
    assert len(agg) == 4
    rows = {r.key(): r for r in agg.take()}
    minute = int(T0 // 60) * 60
    assert rows[("a", "minilm", "1", minute)] == UsageRow("a", "minilm", "1", minute, 1, 0, 0, 10, 150)
    assert rows[("a", "minilm", "1", minute + 60)].compute_ns == 7
    assert rows[("a", "minilm", "2", minute)].compute_ns == 1
    assert rows[("b", "minilm", "1", minute)] == UsageRow("b", "minilm", "1", minute, 2, 3, 1, 4, 5)
    assert len(agg) == 0 and agg.take() == []


def test_usage_batch_json_round_trip() -> None:
    batch = UsageBatch("id-1", (UsageRow("a", "m", "1", 120, 1, 2, 3, 4, 5), UsageRow("b", "m", "2", 180)))
    assert UsageBatch.from_json(batch.to_json()) == batch


def test_apply_batch_is_idempotent(db: Database) -> None:
    batch = UsageBatch("batch-1", (UsageRow("a", "minilm", "1", 600, 1, 1, 0, 12, 1000),))
    assert apply_batch(db, batch) is True
    assert apply_batch(db, batch) is False  # a replay of the same id adds nothing
    assert totals_by_client(db) == {"a": (1, 1, 0, 12, 1000)}
    # Another batch for the same minute adds to the row.
    assert apply_batch(db, UsageBatch("batch-2", (UsageRow("a", "minilm", "1", 600, 2, 3, 1, 8, 5),)))
    assert totals_by_client(db) == {"a": (3, 4, 1, 20, 1005)}
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(usage)).scalar_one() == 1
        ids = {r.batch_id for r in conn.execute(sa.select(usage_batches))}
    assert ids == {"batch-1", "batch-2"}


def test_apply_batch_large_compute_values(db: Database) -> None:
    big = 3 * 10**15  # ~35 days of compute in ns: beyond 32 bits, within BIGINT
    apply_batch(db, UsageBatch("big", (UsageRow("a", "minilm", "1", 0, compute_ns=big),)))
    apply_batch(db, UsageBatch("big2", (UsageRow("a", "minilm", "1", 0, compute_ns=big + 1),)))
    assert totals_by_client(db)["a"][4] == 2 * big + 1


# -- the ledger --------------------------------------------------------------------------------


def varied_records(n: int, seed: int = 7) -> list[UsageRecord]:
    import random

    rnd = random.Random(seed)
    out = []
    for i in range(n):
        out.append(
            record(
                rnd.choice(["a", "b", "c"]),
                T0 + rnd.uniform(-200, 200),
                version=rnd.choice(["1", "2"]),
                num_requests=rnd.randint(0, 1),
                num_texts=rnd.randint(0, 5),
                num_cached=rnd.randint(0, 2),
                num_tokens=rnd.randint(0, 300),
                compute_ns=rnd.randint(0, 10**9) + i,
            )
        )
    return out


async def test_ledger_flushes_recorded_usage(db: Database, tmp_path: Path) -> None:
    flushed: list[tuple[int, bool]] = []
    ledger = UsageLedger(
        db, tmp_path / "spool.jsonl", flush_interval_s=0.01, on_flush=lambda n, ok: flushed.append((n, ok))
    )
    records = varied_records(200)
    await ledger.start()
    try:
        for i, rec in enumerate(records):
            ledger.record(rec)
            if i % 50 == 0:
                await asyncio.sleep(0.02)  # the background loop flushes in between
        deadline = time.monotonic() + 5
        while totals_by_client(db) != expected_totals(records):
            assert time.monotonic() < deadline, "the background flush never wrote everything"
            await asyncio.sleep(0.01)
    finally:
        await ledger.stop()
    assert totals_by_client(db) == expected_totals(records)
    assert ledger.healthy and ledger.num_pending_batches == 0
    assert not (tmp_path / "spool.jsonl").exists()
    assert flushed and all(ok for _, ok in flushed)
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(usage_batches)).scalar_one() == len(flushed)


async def test_stop_flushes_the_last_aggregate(db: Database, tmp_path: Path) -> None:
    ledger = UsageLedger(db, tmp_path / "spool.jsonl", flush_interval_s=60.0)
    await ledger.start()
    records = varied_records(30, seed=3)
    for rec in records:
        ledger.record(rec)
    await ledger.stop()
    assert totals_by_client(db) == expected_totals(records)


async def test_broken_database_spools_and_a_restart_replays_exactly(db: Database, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    broken = sa.create_engine(f"sqlite:///{tmp_path}/no-such-dir/ledger.db")
    ledger = UsageLedger(broken, spool, flush_interval_s=0.01)
    await ledger.start()
    first, second = varied_records(120, seed=1), varied_records(80, seed=2)
    for rec in first:
        ledger.record(rec)
    assert await ledger.flush() is False
    assert not ledger.healthy and ledger.num_failed_flushes >= 1
    for rec in second:
        ledger.record(rec)
    await asyncio.sleep(0.05)  # background retries fail too
    await ledger.stop()
    broken.dispose()
    spooled = Spool(spool).read()
    assert spooled and len({b.batch_id for b in spooled}) == len(spooled)
    assert sum(r.compute_ns for b in spooled for r in b.rows) == sum(r.compute_ns for r in first + second)

    # "Restart": a new ledger on the same spool, the database reachable again.
    restarted = UsageLedger(db, spool, flush_interval_s=0.01)
    await restarted.start()
    await restarted.stop()
    assert totals_by_client(db) == expected_totals(first + second)
    assert not spool.exists()
    assert restarted.healthy


async def test_replay_after_an_ambiguous_commit_counts_once(db: Database, tmp_path: Path) -> None:
    """The database applied a batch but the answer was lost: the spool still holds it; replaying it
    must not count it twice."""
    spool = Spool(tmp_path / "spool.jsonl")
    done = UsageBatch("applied-already", (UsageRow("a", "minilm", "1", 600, 1, 1, 0, 10, 111),))
    pending = UsageBatch("not-yet", (UsageRow("a", "minilm", "1", 600, 1, 2, 0, 20, 222),))
    apply_batch(db, done)
    spool.append([done, pending])
    ledger = UsageLedger(db, spool.path)
    await ledger.start()
    await ledger.stop()
    assert totals_by_client(db) == {"a": (2, 3, 0, 30, 333)}
    assert not spool.path.exists()


async def test_corrupt_spool_line_is_skipped(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    good = UsageBatch("good", (UsageRow("a", "minilm", "1", 600, compute_ns=5),))
    path.write_text(good.to_json() + "\n" + '{"batch_id": "torn", "rows": [{"cli' + "\n", encoding="utf-8")
    ledger = UsageLedger(db, path)
    await ledger.start()
    await ledger.stop()
    assert totals_by_client(db) == {"a": (0, 0, 0, 0, 5)}


def test_spool_append_read_replace(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "deep" / "spool.jsonl")
    assert spool.read() == []
    batches = [UsageBatch(f"b{i}", (UsageRow("a", "m", "1", 60 * i, compute_ns=i),)) for i in range(3)]
    spool.append(batches[:2])
    spool.append(batches[2:])
    assert spool.read() == batches
    assert all(json.loads(line)["batch_id"] for line in spool.path.read_text().splitlines())
    spool.replace(batches[1:])
    assert spool.read() == batches[1:]
    spool.replace([])
    assert not spool.path.exists()


# -- reports -----------------------------------------------------------------------------------


def fill_report_ledger(db: Database) -> None:
    rows = (
        UsageRow("a", "minilm", "1", int(T0 // 60) * 60, 2, 3, 1, 40, 1_500_000_000),
        UsageRow("a", "minilm", "2", int(T0 // 60) * 60 + 60, 1, 1, 0, 10, 500_000_000),
        UsageRow("b", "minilm", "1", int(T0 // 60) * 60, 5, 5, 0, 50, 2_000_000_000),
        UsageRow("b", "other", "1", int(T0 // 60) * 60 + 86_400, 1, 1, 1, 7, 250_000_000),  # the next day
    )
    apply_batch(db, UsageBatch("report", rows))


def test_report_by_client_model_day_minute(db: Database) -> None:
    fill_report_ledger(db)
    since = DAY_START
    by_client = {t.group: t for t in usage_totals(db, since)}
    assert set(by_client) == {"a", "b"}
    a = by_client["a"]
    assert (a.num_requests, a.num_texts, a.num_cached, a.num_tokens) == (3, 4, 1, 50)
    assert a.compute_s == pytest.approx(2.0)
    b = by_client["b"]
    assert (b.num_requests, b.num_tokens) == (6, 57)
    assert b.compute_s == pytest.approx(2.25)

    by_model = {t.group: t.num_tokens for t in usage_totals(db, since, by="model")}
    assert by_model == {"minilm@1": 90, "minilm@2": 10, "other@1": 7}

    by_day = {t.group: t.num_requests for t in usage_totals(db, since, by="day")}
    assert by_day == {"2026-01-05": 8, "2026-01-06": 1}

    by_minute = [t.group for t in usage_totals(db, since, by="minute")]
    assert by_minute[:2] == ["2026-01-05T10:30Z", "2026-01-05T10:31Z"]


def test_report_filters_by_client_and_time(db: Database) -> None:
    fill_report_ledger(db)
    only_b = usage_totals(db, DAY_START, client="b")
    assert [(t.group, t.num_requests) for t in only_b] == [("b", 6)]
    first_day = usage_totals(db, DAY_START, DAY_START + timedelta(days=1), client="b")
    assert [(t.group, t.num_requests) for t in first_day] == [("b", 5)]
    assert usage_totals(db, DAY_START + timedelta(days=3)) == []
    assert usage_totals(db, DAY_START, client="nobody") == []
    with pytest.raises(InvalidRequest) as info:
        usage_totals(db, DAY_START, by="week")
    assert info.value.param == "by"


def test_compute_s_today(db: Database) -> None:
    minute = int(T0 // 60) * 60
    apply_batch(db, UsageBatch("yesterday", (UsageRow("a", "minilm", "1", minute - 86_400, compute_ns=9 * 10**9),)))
    apply_batch(db, UsageBatch("today", (UsageRow("a", "minilm", "1", minute, compute_ns=1_500_000_000),)))
    apply_batch(db, UsageBatch("today-2", (UsageRow("a", "minilm", "2", minute + 60, compute_ns=500_000_000),)))
    apply_batch(db, UsageBatch("today-b", (UsageRow("b", "minilm", "1", minute, compute_ns=2_000_000_000),)))
    assert compute_s_today(db, T0 + 3600) == {"a": pytest.approx(2.0), "b": pytest.approx(2.0)}
    assert compute_s_today(db, T0 + 86_400) == {}


def test_counts_by_table(db: Database, store: ClientStore) -> None:
    """The client and key tables hold one row per client and per key (no hidden duplicates)."""
    store.create_client("one")
    store.create_client("two")
    store.rotate_key("two")
    with db.connect() as conn:
        per_client = Counter(r.client_id for r in conn.execute(sa.select(api_keys)))
        num_clients = conn.execute(sa.select(sa.func.count()).select_from(clients)).scalar_one()
    assert num_clients == 2
    assert sorted(per_client.values()) == [1, 2]

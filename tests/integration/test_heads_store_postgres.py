"""HeadStore against a real PostgreSQL (127.0.0.1:5432), in a fresh database of its own.

Like ``test_postgres_ledger``: the module creates a database with a random name, migrates it,
empties the tables before each test and drops the database (connections and all) at the end, so
it never touches ``test`` or another module's data and can run beside them.
"""

from __future__ import annotations

import hashlib
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, timedelta

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from postgres_support import database_url

from polyray.db.connection import Database, open_database, schema_version
from polyray.db.schema import head_examples, head_shares, heads, metadata
from polyray.errors import InvalidRequest, NotFound
from polyray.heads.kinds import HeadKind, HeadParams, HeadStatus
from polyray.heads.store import HeadStore
from polyray.types import ModelRef

pytestmark = pytest.mark.integration

V1 = ModelRef("minilm", "1")
V2 = ModelRef("minilm", "2")
EXAMPLES: list[tuple[str, object]] = [("good", "pos"), ("bad", "neg"), ("fine", "pos")]


@pytest.fixture
def url(database: str) -> str:
    return database_url(database)


@pytest.fixture
def store(db: Database) -> HeadStore:
    return HeadStore(db)


def count(db: Database, table: sa.Table) -> int:
    with db.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def params_bytes(dim_out: int, dim_in: int, seed: int = 0) -> tuple[HeadParams, bytes]:
    rng = np.random.default_rng(seed)
    params = HeadParams(
        rng.standard_normal((dim_out, dim_in)).astype(np.float32), rng.standard_normal(dim_out).astype(np.float32)
    )
    buf = io.BytesIO()
    np.savez(buf, weight=params.weight, bias=params.bias)
    return params, buf.getvalue()


def test_schema_matches_and_cascades_on_postgres(db: Database) -> None:
    assert schema_version(db) == "0002"
    with db.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    inspector = sa.inspect(db)
    for table in (head_shares, head_examples):
        (fk,) = inspector.get_foreign_keys(table.name)
        assert fk["referred_table"] == "heads" and fk["options"].get("ondelete") == "CASCADE"
    # The database itself cascades too (a head deleted by hand leaves nothing behind).
    store = HeadStore(db)
    spec = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    store.share(spec.head_id, ["beta"])
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM heads WHERE id = :id"), {"id": spec.head_id})
    assert count(db, head_shares) == 0 and count(db, head_examples) == 0


def test_lifecycle_on_postgres(store: HeadStore) -> None:
    spec = store.create("alpha", "sentiment", HeadKind.CLASSIFIER, V1, {"seed": 7}, EXAMPLES)
    assert store.get(spec.head_id) == spec
    assert spec.status is HeadStatus.PENDING and spec.num_examples == 3
    assert [s.head_id for s in store.pending()] == [spec.head_id]
    store.set_progress(spec.head_id, HeadStatus.TRAINING, 0.5)
    assert store.get(spec.head_id).progress == 0.5
    # A 384 x 1000 float32 head: a few MB through BYTEA.
    params, data = params_bytes(1000, 384)
    labels = [f"label-{i}" for i in range(1000)]
    store.finish(spec.head_id, data, hashlib.sha256(data).hexdigest(), 384, 1000, labels, {"accuracy": 0.5})
    ready = store.get(spec.head_id)
    assert (ready.status, ready.progress, ready.dim_in, ready.dim_out) == (HeadStatus.READY, 1.0, 384, 1000)
    assert ready.labels == tuple(labels) and ready.metrics == {"accuracy": 0.5}
    assert store.pending() == []
    loaded = store.load_artifact(spec.head_id)
    assert loaded == data
    with np.load(io.BytesIO(loaded)) as arrays:
        np.testing.assert_array_equal(arrays["weight"], params.weight)
    failed = store.create("alpha", "broken", HeadKind.REGRESSOR, V1, {}, [("x", 1.0)])
    store.fail(failed.head_id, "not enough examples")
    assert (store.get(failed.head_id).status, store.get(failed.head_id).error) == (
        HeadStatus.FAILED,
        "not enough examples",
    )
    with pytest.raises(NotFound) as info:
        store.load_artifact(failed.head_id)
    assert info.value.code == "head_not_ready"


def test_timestamps_are_utc_whatever_the_session_time_zone(url: str, db: Database) -> None:
    store = HeadStore(db)
    spec = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    elsewhere = sa.create_engine(
        url.replace("postgresql://", "postgresql+psycopg://"), connect_args={"options": "-c timezone=Asia/Kolkata"}
    )
    try:
        seen = HeadStore(elsewhere).get(spec.head_id)
    finally:
        elsewhere.dispose()
    assert seen.created_at is not None and seen.created_at.utcoffset() == timedelta(0)
    assert seen.created_at.tzinfo is UTC
    assert seen.created_at == spec.created_at and seen == spec


def test_duplicates_and_concurrent_creates_on_postgres(store: HeadStore) -> None:
    store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    with pytest.raises(InvalidRequest) as info:
        store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    assert info.value.code == "head_exists"
    store.create("alpha", "topic", HeadKind.CLASSIFIER, V2, {}, EXAMPLES)  # a retrain on a new version
    assert [s.model for s in store.find("alpha", "topic")] == [V1, V2]

    workers = 6
    barrier = threading.Barrier(workers)

    def create(_: int) -> str:
        barrier.wait(timeout=10)
        try:
            return store.create("alpha", "race", HeadKind.CLASSIFIER, V1, {}, EXAMPLES).head_id
        except InvalidRequest as exc:
            return str(exc.code)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(create, range(workers)))
    assert outcomes.count("head_exists") == workers - 1
    assert len(store.find("alpha", "race")) == 1
    assert count(store.db, head_examples) == 3 * len(EXAMPLES)


def test_visibility_sharing_and_delete_on_postgres(store: HeadStore) -> None:
    a1 = store.create("alpha", "a1", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    b1 = store.create("beta", "b1", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    b2 = store.create("beta", "b2", HeadKind.CLASSIFIER, V2, {}, EXAMPLES)
    store.share(b1.head_id, ["alpha", "gamma"])
    store.share(b1.head_id, ["alpha"])  # ON CONFLICT DO NOTHING
    assert [s.head_id for s in store.list_visible("alpha")] == [a1.head_id, b1.head_id]
    assert [s.head_id for s in store.list_visible("beta")] == [b1.head_id, b2.head_id]
    assert [s.head_id for s in store.list_visible("beta", V2)] == [b2.head_id]
    assert [s.head_id for s in store.list_visible("gamma")] == [b1.head_id]
    assert store.list_visible("delta") == []
    assert store.get(b1.head_id).shared_with == frozenset({"alpha", "gamma"})
    assert store.unshare(b1.head_id, ["gamma"]).shared_with == frozenset({"alpha"})
    assert len(store.list_all()) == 3

    store.delete(b1.head_id)
    with pytest.raises(NotFound):
        store.get(b1.head_id)
    assert store.list_visible("alpha") == [store.get(a1.head_id)]
    assert count(store.db, head_shares) == 0
    assert count(store.db, head_examples) == 2 * len(EXAMPLES)
    assert count(store.db, heads) == 2


def test_examples_round_trip_on_postgres(store: HeadStore) -> None:
    examples: list[tuple[str, object]] = [
        ("a string label", "positive"),
        ("a float label", -2.5),
        ("a multilabel label", ["sports", "news"]),
        ("no label", None),
        ("unicode: naïve café — 東京 😀", "ünï"),
        ("quote ' and backslash \\ and \\u0000 spelled out", "x"),
    ]
    examples += [(f"bulk {i}", ["a", "b"][i % 2]) for i in range(5000)]  # one bulk insert
    spec = store.create("alpha", "mixed", HeadKind.MULTILABEL, V1, {"threshold": 0.4}, examples)
    assert store.examples(spec.head_id) == examples
    assert store.get(spec.head_id).threshold == 0.4
    with pytest.raises(InvalidRequest):
        store.create("alpha", "nul", HeadKind.CLASSIFIER, V1, {}, [("nul\x00", "x")])


def test_generation_seen_by_another_process(store: HeadStore, url: str) -> None:
    other = open_database(url, upgrade=False)
    try:
        watcher = HeadStore(other)
        first = watcher.generation()  # the fixture emptied the table: 0 until the first write
        spec = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
        second = watcher.generation()
        store.share(spec.head_id, ["beta"])
        third = watcher.generation()
        store.delete(spec.head_id)
        fourth = watcher.generation()
        assert len({first, second, third, fourth}) == 4
        # Concurrent writers never lose an increment (the row lock serializes them).
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(
                pool.map(lambda i: store.create("alpha", f"h{i}", HeadKind.REGRESSOR, V1, {}, [("x", 1.0)]), range(20))
            )
        assert watcher.generation() == fourth + 20
    finally:
        other.dispose()

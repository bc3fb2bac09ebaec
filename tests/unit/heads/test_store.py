"""HeadStore on SQLite (a file per test, migrated by ``open_database`` like a real deployment)."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from polyray.db.connection import Database, open_database, schema_version
from polyray.db.schema import head_examples, head_generation, head_shares, heads
from polyray.errors import BackendError, InvalidRequest, NotFound
from polyray.heads.kinds import HeadKind, HeadParams, HeadSpec, HeadStatus
from polyray.heads.store import HeadStore
from polyray.types import ModelRef

V1 = ModelRef("minilm", "1")
V2 = ModelRef("minilm", "2")
EXAMPLES: list[tuple[str, object]] = [("good", "pos"), ("bad", "neg"), ("fine", "pos")]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    db = open_database(f"sqlite:///{tmp_path}/heads.db")
    yield db
    db.dispose()


@pytest.fixture
def store(db: Database) -> HeadStore:
    return HeadStore(db)


def npz(params: HeadParams) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, weight=params.weight, bias=params.bias)
    return buf.getvalue()


def count(db: Database, table: sa.Table) -> int:
    with db.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def train(store: HeadStore, head_id: str, labels: tuple[str, ...] = ("neg", "pos")) -> bytes:
    rng = np.random.default_rng(0)
    params = HeadParams(rng.standard_normal((len(labels), 8)).astype(np.float32), np.zeros(len(labels), np.float32))
    data = npz(params)
    store.finish(head_id, data, hashlib.sha256(data).hexdigest(), 8, len(labels), labels, {"accuracy": 0.9})
    return data


# -- schema ------------------------------------------------------------------------------------


def test_migration_0002_creates_the_head_tables(db: Database) -> None:
    assert schema_version(db) == "0002"
    inspector = sa.inspect(db)
    assert {"heads", "head_shares", "head_examples", "head_generation"} <= set(inspector.get_table_names())
    # Alembic's comparison ignores ON DELETE; check it here so the schema module and the
    # migration cannot drift apart on it.
    for table in (head_shares, head_examples):
        (fk,) = inspector.get_foreign_keys(table.name)
        assert (fk["constrained_columns"], fk["referred_table"]) == (["head_id"], "heads")
        assert fk["options"].get("ondelete") == "CASCADE"
    assert [c["column_names"] for c in inspector.get_unique_constraints("heads")] == [
        ["owner", "name", "model_name", "model_version"]
    ]
    with db.connect() as conn:
        assert conn.execute(sa.select(head_generation)).all() == [(1, 0)]


# -- create, get, find -------------------------------------------------------------------------


def test_create_and_get(store: HeadStore) -> None:
    before = datetime.now(UTC)
    spec = store.create(
        "alpha", "sentiment", HeadKind.CLASSIFIER, V1, {"seed": 3, "validation_fraction": 0.2}, EXAMPLES
    )
    assert spec.head_id.startswith("head-") and len(spec.head_id) == 29
    int(spec.head_id.removeprefix("head-"), 16)
    assert (spec.owner, spec.name, spec.kind, spec.model, spec.status) == (
        "alpha",
        "sentiment",
        HeadKind.CLASSIFIER,
        V1,
        HeadStatus.PENDING,
    )
    assert spec.ref == "alpha/sentiment"
    assert (spec.progress, spec.error, spec.dim_in, spec.dim_out, spec.labels) == (0.0, None, 0, 0, ())
    assert spec.options == {"seed": 3, "validation_fraction": 0.2}
    assert spec.metrics == {} and spec.shared_with == frozenset()
    assert spec.num_examples == 3
    assert spec.created_at is not None and spec.updated_at is not None
    assert spec.created_at.tzinfo is not None and spec.created_at >= before.replace(microsecond=0)
    assert store.get(spec.head_id) == spec
    # The kind may be given as its string.
    assert store.create("alpha", "score", "regressor", V1, {}, [("x", 1.0)]).kind is HeadKind.REGRESSOR


def test_get_unknown_head(store: HeadStore) -> None:
    with pytest.raises(NotFound) as info:
        store.get("head-000000000000000000000000")
    assert info.value.code == "head_not_found"


def test_duplicate_name_for_the_same_model_version_is_refused(store: HeadStore) -> None:
    first = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    with pytest.raises(InvalidRequest) as info:
        store.create("alpha", "topic", HeadKind.MULTILABEL, V1, {}, EXAMPLES)
    assert (info.value.code, info.value.param) == ("head_exists", "name")
    assert "alpha/topic" in info.value.message and "minilm@1" in info.value.message
    # The same name on another version (a retrain) or of another owner is a different head.
    second = store.create("alpha", "topic", HeadKind.CLASSIFIER, V2, {}, store.examples(first.head_id))
    other = store.create("beta", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    assert len({first.head_id, second.head_id, other.head_id}) == 3
    assert count(store.db, heads) == 3


def test_concurrent_creates_of_one_head_make_one(store: HeadStore) -> None:
    barrier = threading.Barrier(4)

    def create(_: int) -> str:
        barrier.wait(timeout=10)
        try:
            return store.create("alpha", "race", HeadKind.CLASSIFIER, V1, {}, EXAMPLES).head_id
        except InvalidRequest as exc:
            return str(exc.code)

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(create, range(4)))
    assert sorted(o for o in outcomes if o == "head_exists") == ["head_exists"] * 3
    assert count(store.db, heads) == 1
    assert count(store.db, head_examples) == len(EXAMPLES)  # the losers left no examples behind


def test_the_unique_constraint_backs_the_duplicate_check(store: HeadStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a create racing past the check meets: the constraint, reported as the same error."""
    store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    monkeypatch.setattr(HeadStore, "_find_ids", staticmethod(lambda *_: []))
    with pytest.raises(InvalidRequest) as info:
        store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    assert info.value.code == "head_exists"
    assert count(store.db, heads) == 1 and count(store.db, head_examples) == len(EXAMPLES)


@pytest.mark.parametrize(
    ("owner", "name", "kind", "options", "examples", "code"),
    [
        ("alpha", "Bad Name", "classifier", {}, EXAMPLES, "invalid_head_name"),
        ("alpha", "ok", "tree", {}, EXAMPLES, "invalid_head_kind"),
        ("alpha", "ok", "regressor", {"x": float("nan")}, EXAMPLES, "invalid_options"),
        ("alpha", "ok", "regressor", {"x": object()}, EXAMPLES, "invalid_options"),
        ("alpha", "ok", "regressor", {}, [("a", float("inf"))], "invalid_examples"),
        ("alpha", "ok", "regressor", {}, [("a", {1, 2})], "invalid_examples"),
        ("alpha", "ok", "classifier", {}, [("nul\x00byte", "x")], "invalid_examples"),
        ("alpha", "ok", "classifier", {}, [(7, "x")], "invalid_examples"),
    ],
)
def test_invalid_heads_are_refused_and_store_nothing(
    store: HeadStore,
    owner: str,
    name: str,
    kind: str,
    options: dict[str, object],
    examples: list[tuple[str, object]],
    code: str,
) -> None:
    with pytest.raises(InvalidRequest) as info:
        store.create(owner, name, kind, V1, options, examples)
    assert info.value.code == code
    assert count(store.db, heads) == 0 and count(store.db, head_examples) == 0
    assert store.generation() == 0


def test_find_returns_every_version_or_one(store: HeadStore) -> None:
    v1 = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    v2 = store.create("alpha", "topic", HeadKind.CLASSIFIER, V2, {}, EXAMPLES)
    store.create("alpha", "other", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    store.create("beta", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    assert [s.head_id for s in store.find("alpha", "topic")] == [v1.head_id, v2.head_id]
    assert store.find("alpha", "topic", V2) == [v2]
    assert store.find("alpha", "topic", ModelRef("minilm", "3")) == []
    assert store.find("gamma", "topic") == []


# -- visibility --------------------------------------------------------------------------------


def test_visibility_own_and_shared_only(store: HeadStore) -> None:
    a1 = store.create("alpha", "a1", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    a2 = store.create("alpha", "a2", HeadKind.REGRESSOR, V2, {}, [("x", 0.5)])
    b1 = store.create("beta", "b1", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    store.share(b1.head_id, ["alpha", "gamma"])

    def ids(specs: list[HeadSpec]) -> list[str]:
        return [s.head_id for s in specs]

    assert ids(store.list_visible("alpha")) == [a1.head_id, a2.head_id, b1.head_id]
    assert ids(store.list_visible("alpha", V1)) == [a1.head_id, b1.head_id]
    assert ids(store.list_visible("beta")) == [b1.head_id]
    assert ids(store.list_visible("gamma")) == [b1.head_id]
    assert store.list_visible("delta") == []
    assert ids(store.list_all()) == [a1.head_id, a2.head_id, b1.head_id]
    assert ids(store.list_all(V2)) == [a2.head_id]
    for spec in store.list_all():
        assert spec.visible_to(spec.owner)
        assert spec.visible_to("gamma") == (spec.head_id == b1.head_id)
    assert store.get(b1.head_id).shared_with == frozenset({"alpha", "gamma"})


def test_share_and_unshare(store: HeadStore) -> None:
    spec = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    shared = store.share(spec.head_id, ["beta", "gamma", "beta"])
    assert shared.shared_with == frozenset({"beta", "gamma"})
    assert shared.updated_at is not None and spec.updated_at is not None and shared.updated_at >= spec.updated_at
    # Twice, or with the owner: no change, no error. A bare string is one client, not its letters.
    assert store.share(spec.head_id, ["gamma", "alpha"]).shared_with == frozenset({"beta", "gamma"})
    assert store.share(spec.head_id, "delta").shared_with == frozenset({"beta", "gamma", "delta"})
    assert store.unshare(spec.head_id, ["beta", "nobody"]).shared_with == frozenset({"gamma", "delta"})
    assert store.unshare(spec.head_id, []).shared_with == frozenset({"gamma", "delta"})
    assert [s.head_id for s in store.list_visible("beta")] == []
    assert count(store.db, head_shares) == 2
    with pytest.raises(InvalidRequest) as info:
        store.share(spec.head_id, ["Not A Client"])
    assert (info.value.code, info.value.param) == ("invalid_client", "clients")
    with pytest.raises(NotFound):
        store.share("head-missing", ["beta"])
    with pytest.raises(NotFound):
        store.unshare("head-missing", ["beta"])


# -- training ----------------------------------------------------------------------------------


def test_progress_finish_and_artifact_round_trip(store: HeadStore) -> None:
    spec = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    with pytest.raises(NotFound) as info:
        store.load_artifact(spec.head_id)
    assert info.value.code == "head_not_ready"
    store.set_progress(spec.head_id, HeadStatus.TRAINING, 0.25)
    training = store.get(spec.head_id)
    assert (training.status, training.progress, training.error) == (HeadStatus.TRAINING, 0.25, None)
    store.set_progress(spec.head_id, HeadStatus.TRAINING, 1.0000001)  # float noise is clamped
    assert store.get(spec.head_id).progress == 1.0
    with pytest.raises(ValueError, match="finish"):
        store.set_progress(spec.head_id, HeadStatus.READY, 1.0)

    rng = np.random.default_rng(1)
    params = HeadParams(rng.standard_normal((3, 384)).astype(np.float32), rng.standard_normal(3).astype(np.float32))
    data = npz(params)
    with pytest.raises(ValueError, match="sha256"):
        store.finish(spec.head_id, data, "0" * 64, 384, 3, ["a", "b", "c"], {})
    store.finish(
        spec.head_id,
        data,
        hashlib.sha256(data).hexdigest(),
        384,
        3,
        ["a", "b", "c"],
        {"accuracy": 0.75, "r2": float("nan")},
    )
    ready = store.get(spec.head_id)
    assert (ready.status, ready.progress, ready.dim_in, ready.dim_out) == (HeadStatus.READY, 1.0, 384, 3)
    assert ready.labels == ("a", "b", "c")
    assert ready.metrics == {"accuracy": 0.75, "r2": None}
    assert ready.updated_at is not None and training.updated_at is not None
    assert ready.updated_at >= training.updated_at and ready.created_at == spec.created_at
    loaded = store.load_artifact(spec.head_id)
    assert loaded == data
    with np.load(io.BytesIO(loaded)) as arrays:
        again = HeadParams(arrays["weight"], arrays["bias"])
    np.testing.assert_array_equal(again.weight, params.weight)
    np.testing.assert_array_equal(again.bias, params.bias)
    # An artifact altered behind the store's back is refused, not served.
    with store.db.begin() as conn:
        conn.execute(
            heads.update()
            .where(heads.c.id == spec.head_id)
            .values(artifact=data[:100] + bytes([data[100] ^ 1]) + data[101:])
        )
    with pytest.raises(BackendError) as corrupt:
        store.load_artifact(spec.head_id)
    assert corrupt.value.code == "head_corrupt"


def test_fail_and_retry(store: HeadStore) -> None:
    spec = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    store.set_progress(spec.head_id, HeadStatus.TRAINING, 0.5)
    store.fail(spec.head_id, "a classifier needs at least two labels")
    failed = store.get(spec.head_id)
    assert (failed.status, failed.error, failed.progress) == (
        HeadStatus.FAILED,
        "a classifier needs at least two labels",
        0.5,
    )
    # Re-queued: the error goes with the new status unless given again.
    store.set_progress(spec.head_id, HeadStatus.PENDING, 0.0)
    assert (store.get(spec.head_id).status, store.get(spec.head_id).error) == (HeadStatus.PENDING, None)


def test_training_calls_on_a_deleted_head_raise_not_found(store: HeadStore) -> None:
    spec = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    store.delete(spec.head_id)
    with pytest.raises(NotFound):
        store.set_progress(spec.head_id, HeadStatus.TRAINING, 0.1)
    with pytest.raises(NotFound):
        train(store, spec.head_id)
    with pytest.raises(NotFound):
        store.fail(spec.head_id, "boom")
    with pytest.raises(NotFound) as info:
        store.load_artifact(spec.head_id)
    assert info.value.code == "head_not_found"


def test_pending_lists_heads_waiting_for_or_in_training(store: HeadStore) -> None:
    waiting = store.create("alpha", "waiting", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    running = store.create("beta", "running", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    done = store.create("alpha", "done", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    broken = store.create("alpha", "broken", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    store.set_progress(running.head_id, HeadStatus.TRAINING, 0.4)
    train(store, done.head_id)
    store.fail(broken.head_id, "no")
    assert [s.head_id for s in store.pending()] == [waiting.head_id, running.head_id]  # oldest first


# -- examples ----------------------------------------------------------------------------------


def test_examples_round_trip_every_label_type(store: HeadStore) -> None:
    examples: list[tuple[str, object]] = [
        ("a string label", "positive"),
        ("a float label", 0.125),
        ("an int label", 3),
        ("a multilabel label", ["sports", "news"]),
        ("an empty multilabel label", []),
        ("no label (projection)", None),
        ("unicode: naïve café — 東京 😀", "ünï"),
        ("", ""),
    ]
    examples += [(f"text {i}", float(i)) for i in range(30)]  # seq is ordered as a number, not text
    spec = store.create("alpha", "mixed", HeadKind.PROJECTION, V1, {"dimensions": 2}, examples)
    assert spec.num_examples == len(examples)
    got = store.examples(spec.head_id)
    assert got == examples
    assert [type(label) for _, label in got[:6]] == [str, float, int, list, list, type(None)]
    empty = store.create("alpha", "empty", HeadKind.PROJECTION, V1, {}, [])
    assert store.examples(empty.head_id) == [] and empty.num_examples == 0
    with pytest.raises(NotFound):
        store.examples("head-missing")


# -- delete ------------------------------------------------------------------------------------


def test_delete_removes_the_head_its_shares_and_examples(store: HeadStore) -> None:
    doomed = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
    kept = store.create("alpha", "topic", HeadKind.CLASSIFIER, V2, {}, EXAMPLES)
    store.share(doomed.head_id, ["beta", "gamma"])
    store.share(kept.head_id, ["beta"])
    train(store, doomed.head_id)
    store.delete(doomed.head_id)
    with pytest.raises(NotFound):
        store.get(doomed.head_id)
    with pytest.raises(NotFound):
        store.delete(doomed.head_id)
    with store.db.connect() as conn:
        assert conn.execute(sa.select(head_examples.c.head_id).distinct()).scalars().all() == [kept.head_id]
        assert conn.execute(sa.select(head_shares)).all() == [(kept.head_id, "beta")]
    assert store.get(kept.head_id).shared_with == frozenset({"beta"})
    assert store.examples(kept.head_id) == EXAMPLES
    # The name is free again for that version.
    assert store.create("alpha", "topic", HeadKind.REGRESSOR, V1, {}, [("x", 1.0)]).kind is HeadKind.REGRESSOR


# -- change detection and persistence ----------------------------------------------------------


def test_generation_moves_on_every_write_and_is_seen_by_another_engine(store: HeadStore, tmp_path: Path) -> None:
    other = open_database(f"sqlite:///{tmp_path}/heads.db")  # another process's view
    try:
        watcher = HeadStore(other)
        seen = [watcher.generation()]
        assert seen == [0]
        spec = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
        writes: list[Callable[[], object]] = [
            lambda: store.set_progress(spec.head_id, HeadStatus.TRAINING, 0.5),
            lambda: train(store, spec.head_id),
            lambda: store.share(spec.head_id, ["beta"]),
            lambda: store.unshare(spec.head_id, ["beta"]),
            lambda: store.fail(spec.head_id, "x"),
            lambda: store.delete(spec.head_id),
        ]
        seen.append(watcher.generation())
        for write in writes:
            write()
            seen.append(watcher.generation())
        assert len(set(seen)) == len(seen), seen
        # Reads and refused writes change nothing.
        store.list_all()
        store.pending()
        with pytest.raises(NotFound):
            store.delete(spec.head_id)
        assert watcher.generation() == seen[-1]
        # If the counter row is lost (a fixture emptied the table), writes re-create it.
        with other.begin() as conn:
            conn.execute(head_generation.delete())
        assert watcher.generation() == 0
        store.create("alpha", "again", HeadKind.CLASSIFIER, V1, {}, EXAMPLES)
        assert watcher.generation() == 1
    finally:
        other.dispose()


def test_everything_survives_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/reopen.db"
    db = open_database(url)
    try:
        store = HeadStore(db)
        spec = store.create("alpha", "topic", HeadKind.CLASSIFIER, V1, {"seed": 1}, EXAMPLES)
        store.share(spec.head_id, ["beta"])
        data = train(store, spec.head_id)
        before = store.get(spec.head_id)
    finally:
        db.dispose()
    again = open_database(url)
    try:
        store = HeadStore(again)
        assert store.get(spec.head_id) == before
        assert store.load_artifact(spec.head_id) == data
        assert store.examples(spec.head_id) == EXAMPLES
        assert before.updated_at is not None and before.updated_at.tzinfo is not None
    finally:
        again.dispose()

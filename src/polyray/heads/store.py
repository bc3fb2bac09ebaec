"""Heads in the database: descriptions, parameters (npz bytes), shares and training examples.

The one place that reads and writes the ``heads``, ``head_shares``, ``head_examples`` and
``head_generation`` tables (``polyray.db.schema``, migration 0002). Methods block; the
server calls them from threads, tests and the CLI directly.

Decisions worth knowing:

* A head row is one (owner, name, model version). Retraining a head on a new model version
  creates a new row with the same name (``create`` with the examples read by ``examples``);
  the old row keeps serving the old version.
* Listing queries never read ``artifact``: a head's parameters can be megabytes, and the server
  loads them once per head (``load_artifact``), not on every listing.
* Children (shares, examples) are deleted explicitly, in the head's transaction: SQLite enforces
  ``ON DELETE CASCADE`` only with ``PRAGMA foreign_keys=ON``, which this project does not set.
* Every committed change increments ``generation()`` in the same transaction. A server polls it
  (one primary-key read) to notice changes made by another process (a second replica, the CLI)
  and reloads only then. A counter, not ``max(updated_at)``: clocks of two machines may disagree,
  and a delete leaves no timestamp behind. Compare generations for inequality only.
* The store validates what it needs to store data faithfully on both SQLite and PostgreSQL (head
  names, JSON-able options and labels, no NUL in texts); what makes a good training set is the
  trainer's and the API's business.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from polyray.db.connection import Database
from polyray.db.schema import head_examples, head_generation, head_shares, heads
from polyray.errors import BackendError, InvalidRequest, NotFound
from polyray.heads.kinds import HeadKind, HeadSpec, HeadStatus, check_head_name
from polyray.tenancy.model import check_name
from polyray.types import ModelRef

_GENERATION_ROW = 1

# Every column but ``artifact``: what a HeadSpec is made of.
_SPEC_COLUMNS = [c for c in heads.columns if c.name != "artifact"]


def new_head_id() -> str:
    """``head-`` and 24 random hex digits (96 bits): unguessable, so an id alone reveals nothing."""
    return "head-" + secrets.token_hex(12)


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes (they are stored in UTC); PostgreSQL returns the session's zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _client_json(value: object, what: str, param: str) -> str:
    """JSON of client-given data; NaN and infinity are refused (they are not JSON, and no other
    reader of the database would parse them)."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{what} cannot be stored: {exc}", param=param, code=f"invalid_{param}") from None


def _metrics_json(metrics: Mapping[str, float]) -> str:
    """Training may produce an undefined figure (R² of constant targets): stored as null, not NaN."""
    return json.dumps({k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()})


def _spec(row: sa.Row[Any], shared_with: Iterable[str] = ()) -> HeadSpec:
    return HeadSpec(
        head_id=row.id,
        owner=row.owner,
        name=row.name,
        kind=HeadKind(row.kind),
        model=ModelRef(row.model_name, row.model_version),
        status=HeadStatus(row.status),
        dim_in=row.dim_in,
        dim_out=row.dim_out,
        labels=tuple(json.loads(row.labels)),
        shared_with=frozenset(shared_with),
        options=json.loads(row.options),
        metrics=json.loads(row.metrics),
        num_examples=row.num_examples,
        progress=row.progress,
        error=row.error,
        created_at=_aware(row.created_at),
        updated_at=_aware(row.updated_at),
    )


def _not_found(head_id: str) -> NotFound:
    return NotFound(f"no head with id {head_id!r}", param="head", code="head_not_found")


def _client_names(clients: Iterable[str]) -> list[str]:
    """Sorted, distinct, valid client names. Whether such a client exists is the caller's check:
    a share may name a client created later."""
    if isinstance(clients, str):  # share(id, "team") would otherwise share with "t", "e", ...
        clients = [clients]
    names = sorted(set(clients))
    for name in names:
        try:
            check_name(name)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(str(exc), param="clients", code="invalid_client") from None
    return names


def _model_filter(model: ModelRef | None) -> list[sa.ColumnElement[bool]]:
    if model is None:
        return []
    return [heads.c.model_name == model.name, heads.c.model_version == model.version]


class HeadStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- creating ------------------------------------------------------------------------
    def create(
        self,
        owner: str,
        name: str,
        kind: HeadKind | str,
        model: ModelRef,
        options: Mapping[str, Any],
        examples: Sequence[tuple[str, object]],
    ) -> HeadSpec:
        """A new pending head with its training examples, in one transaction (a head never exists
        without its examples). A head of that owner and name already bound to ``model``:
        InvalidRequest ``head_exists``."""
        check_head_name(name)
        try:
            kind = HeadKind(kind)
        except ValueError:
            raise InvalidRequest(
                f"unknown head kind {kind!r}; one of {', '.join(HeadKind)}", param="kind", code="invalid_head_kind"
            ) from None
        options_json = _client_json(dict(options), "options", "options")
        rows = []
        for seq, (text, label) in enumerate(examples):
            if not isinstance(text, str) or "\x00" in text:
                # PostgreSQL text cannot hold NUL; refusing it everywhere keeps both backends alike.
                raise InvalidRequest(
                    f"example {seq}: the text must be a string without NUL characters",
                    param="examples",
                    code="invalid_examples",
                )
            rows.append({"seq": seq, "text": text, "label": _client_json(label, f"example {seq}'s label", "examples")})
        head_id = new_head_id()
        now = _now()
        exists = InvalidRequest(
            f"head {owner}/{name} already exists for model {model}; delete it first or choose another name",
            param="name",
            code="head_exists",
        )
        try:
            with self.db.begin() as conn:
                if self._find_ids(conn, owner, name, model):
                    raise exists
                conn.execute(
                    heads.insert().values(
                        id=head_id,
                        owner=owner,
                        name=name,
                        kind=kind.value,
                        model_name=model.name,
                        model_version=model.version,
                        status=HeadStatus.PENDING.value,
                        progress=0.0,
                        error=None,
                        dim_in=0,
                        dim_out=0,
                        labels="[]",
                        options=options_json,
                        metrics="{}",
                        num_examples=len(rows),
                        artifact=None,
                        artifact_sha256=None,
                        created_at=now,
                        updated_at=now,
                    )
                )
                if rows:
                    conn.execute(head_examples.insert(), [{"head_id": head_id, **r} for r in rows])
                self._bump(conn)
        except sa.exc.IntegrityError:
            # Two creates raced past the check above; the unique constraint let one through.
            raise exists from None
        return self.get(head_id)

    # -- reading -------------------------------------------------------------------------
    def get(self, head_id: str) -> HeadSpec:
        with self.db.connect() as conn:
            found = self._select(conn, heads.c.id == head_id)
        if not found:
            raise _not_found(head_id)
        return found[0]

    def find(self, owner: str, name: str, model: ModelRef | None = None) -> list[HeadSpec]:
        """The heads ``owner/name``: one per model version it was trained for (oldest first), or
        only the one bound to ``model`` (an empty list when there is none)."""
        with self.db.connect() as conn:
            return self._select(conn, heads.c.owner == owner, heads.c.name == name, *_model_filter(model))

    def list_visible(self, client: str, model: ModelRef | None = None) -> list[HeadSpec]:
        """What ``client`` may apply: its own heads and those shared with it."""
        shared = sa.select(head_shares.c.head_id).where(head_shares.c.client == client)
        with self.db.connect() as conn:
            return self._select(conn, sa.or_(heads.c.owner == client, heads.c.id.in_(shared)), *_model_filter(model))

    def list_all(self, model: ModelRef | None = None) -> list[HeadSpec]:
        """Every head (the admin view, and what a server loads at start)."""
        with self.db.connect() as conn:
            return self._select(conn, *_model_filter(model))

    def pending(self) -> list[HeadSpec]:
        """Heads waiting for or in training, oldest first: after a restart the server re-queues
        them (a head left ``training`` by a dead process would otherwise never finish)."""
        with self.db.connect() as conn:
            return self._select(
                conn,
                heads.c.status.in_([HeadStatus.PENDING.value, HeadStatus.TRAINING.value]),
                order_by=(heads.c.created_at, heads.c.id),
            )

    def load_artifact(self, head_id: str) -> bytes:
        """The npz bytes of a ready head's parameters, checked against their stored SHA-256 (a
        corrupted artifact fails here, loudly, instead of serving wrong outputs).
        NotFound ``head_not_found``, or ``head_not_ready`` when it has no parameters yet."""
        with self.db.connect() as conn:
            row = conn.execute(
                sa.select(heads.c.artifact, heads.c.artifact_sha256).where(heads.c.id == head_id)
            ).first()
        if row is None:
            raise _not_found(head_id)
        if row.artifact is None:
            raise NotFound(f"head {head_id!r} has no trained parameters yet", param="head", code="head_not_ready")
        data = bytes(row.artifact)
        if hashlib.sha256(data).hexdigest() != row.artifact_sha256:
            raise BackendError(f"head {head_id!r}: stored parameters do not match their SHA-256", code="head_corrupt")
        return data

    def examples(self, head_id: str) -> list[tuple[str, object]]:
        """The training examples as given to ``create`` (text, JSON-decoded label), in order."""
        with self.db.connect() as conn:
            if conn.execute(sa.select(heads.c.id).where(heads.c.id == head_id)).first() is None:
                raise _not_found(head_id)
            rows = conn.execute(
                sa.select(head_examples.c.text, head_examples.c.label)
                .where(head_examples.c.head_id == head_id)
                .order_by(head_examples.c.seq)
            )
            return [(r.text, json.loads(r.label)) for r in rows]

    def generation(self) -> int:
        """A counter every committed change to any head increments (including progress updates).
        Poll it and reload when it differs from the last value seen; never compare for order."""
        with self.db.connect() as conn:
            value = conn.execute(
                sa.select(head_generation.c.generation).where(head_generation.c.id == _GENERATION_ROW)
            ).scalar_one_or_none()
        return int(value or 0)

    # -- training ------------------------------------------------------------------------
    def set_progress(self, head_id: str, status: HeadStatus, progress: float, error: str | None = None) -> None:
        """Record training progress (clamped to 0..1). ``ready`` is refused: only ``finish``
        stores the parameters that a ready head must have. NotFound if the head was deleted
        meanwhile (the trainer should then drop its work)."""
        status = HeadStatus(status)
        if status is HeadStatus.READY:
            raise ValueError("a head becomes ready only through finish(), with its parameters")
        self._update(head_id, status=status.value, progress=min(1.0, max(0.0, float(progress))), error=error)

    def finish(
        self,
        head_id: str,
        params_bytes: bytes,
        sha256: str,
        dim_in: int,
        dim_out: int,
        labels: Sequence[str],
        metrics: Mapping[str, float],
    ) -> None:
        """Store the trained parameters (``HeadParams`` as npz bytes; ``sha256`` is of those bytes)
        and make the head ready. Non-finite metrics are stored as null."""
        if hashlib.sha256(params_bytes).hexdigest() != sha256:
            raise ValueError(f"head {head_id!r}: sha256 {sha256!r} is not the digest of the parameters given")
        self._update(
            head_id,
            status=HeadStatus.READY.value,
            progress=1.0,
            error=None,
            artifact=params_bytes,
            artifact_sha256=sha256,
            dim_in=int(dim_in),
            dim_out=int(dim_out),
            labels=json.dumps([str(label) for label in labels]),
            metrics=_metrics_json(metrics),
        )

    def fail(self, head_id: str, error: str) -> None:
        """Training failed for good; ``error`` is shown to the head's owner."""
        self._update(head_id, status=HeadStatus.FAILED.value, error=error)

    # -- sharing and deleting ------------------------------------------------------------
    def share(self, head_id: str, clients: Iterable[str]) -> HeadSpec:
        """Let ``clients`` apply the head too; sharing twice, or with the owner, changes nothing."""
        names = _client_names(clients)
        with self.db.begin() as conn:
            owner = self._owner(conn, head_id)
            rows = [{"head_id": head_id, "client": c} for c in names if c != owner]
            if rows:
                insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(head_shares)
                conn.execute(insert.on_conflict_do_nothing(), rows)
            self._touch(conn, head_id)
        return self.get(head_id)

    def unshare(self, head_id: str, clients: Iterable[str]) -> HeadSpec:
        """Withdraw the head from ``clients``; names it was not shared with are ignored."""
        names = _client_names(clients)
        with self.db.begin() as conn:
            self._owner(conn, head_id)
            if names:
                conn.execute(
                    head_shares.delete().where(head_shares.c.head_id == head_id, head_shares.c.client.in_(names))
                )
            self._touch(conn, head_id)
        return self.get(head_id)

    def delete(self, head_id: str) -> None:
        """Delete the head, its shares and its examples, all or nothing."""
        with self.db.begin() as conn:
            self._owner(conn, head_id)
            conn.execute(head_examples.delete().where(head_examples.c.head_id == head_id))
            conn.execute(head_shares.delete().where(head_shares.c.head_id == head_id))
            conn.execute(heads.delete().where(heads.c.id == head_id))
            self._bump(conn)

    # -- helpers -------------------------------------------------------------------------
    def _select(
        self,
        conn: sa.Connection,
        *where: sa.ColumnElement[bool],
        order_by: Sequence[sa.ColumnElement[Any]] | None = None,
    ) -> list[HeadSpec]:
        """Specs matching ``where``, with their shares read by the same filter in the same
        connection (two queries whatever the number of heads)."""
        order = order_by or (heads.c.owner, heads.c.name, heads.c.created_at, heads.c.id)
        rows = conn.execute(sa.select(*_SPEC_COLUMNS).where(*where).order_by(*order)).all()
        if not rows:
            return []
        shared: dict[str, set[str]] = {}
        ids = sa.select(heads.c.id).where(*where)
        for head_id, client in conn.execute(
            sa.select(head_shares.c.head_id, head_shares.c.client).where(head_shares.c.head_id.in_(ids))
        ):
            shared.setdefault(head_id, set()).add(client)
        return [_spec(r, shared.get(r.id, ())) for r in rows]

    @staticmethod
    def _find_ids(conn: sa.Connection, owner: str, name: str, model: ModelRef) -> list[str]:
        query = sa.select(heads.c.id).where(heads.c.owner == owner, heads.c.name == name, *_model_filter(model))
        return list(conn.execute(query).scalars())

    @staticmethod
    def _owner(conn: sa.Connection, head_id: str) -> str:
        owner = conn.execute(sa.select(heads.c.owner).where(heads.c.id == head_id)).scalar_one_or_none()
        if owner is None:
            raise _not_found(head_id)
        return str(owner)

    def _update(self, head_id: str, **values: object) -> None:
        with self.db.begin() as conn:
            done = conn.execute(heads.update().where(heads.c.id == head_id).values(updated_at=_now(), **values))
            if done.rowcount == 0:
                raise _not_found(head_id)
            self._bump(conn)

    def _touch(self, conn: sa.Connection, head_id: str) -> None:
        conn.execute(heads.update().where(heads.c.id == head_id).values(updated_at=_now()))
        self._bump(conn)

    @staticmethod
    def _bump(conn: sa.Connection) -> None:
        """Increment the generation in the caller's transaction. The row is made by migration
        0002; re-created here if something emptied the table (test fixtures that clear every
        table), so writes never fail for want of it."""
        done = conn.execute(
            head_generation.update()
            .where(head_generation.c.id == _GENERATION_ROW)
            .values(generation=head_generation.c.generation + 1)
        )
        if done.rowcount == 0:
            conn.execute(head_generation.insert().values(id=_GENERATION_ROW, generation=1))

"""The ledger's tables (SQLAlchemy Core). The schema is versioned by the Alembic migrations in
``migrations/``; this module is what the code queries, and a test checks the two agree."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

clients = sa.Table(
    "clients",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(63), nullable=False, unique=True),
    sa.Column("priority", sa.String(16), nullable=False),
    sa.Column("share", sa.Float, nullable=False),
    sa.Column("requests_per_s", sa.Float, nullable=True),
    sa.Column("tokens_per_s", sa.Float, nullable=True),
    sa.Column("max_concurrent", sa.Integer, nullable=True),
    sa.Column("daily_compute_s", sa.Float, nullable=True),
    sa.Column("disabled", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# One row per key. ``client_id`` NULL and role 'admin' is an admin credential: admin keys belong to
# no client, so a client key can never reach admin routes and an admin key never spends quota.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("client_id", sa.Integer, sa.ForeignKey("clients.id"), nullable=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)

usage = sa.Table(
    "usage_minutes",
    metadata,
    sa.Column("client", sa.String(63), primary_key=True),
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("num_requests", sa.BigInteger, nullable=False),
    sa.Column("num_texts", sa.BigInteger, nullable=False),
    sa.Column("num_cached", sa.BigInteger, nullable=False),
    sa.Column("num_tokens", sa.BigInteger, nullable=False),
    sa.Column("compute_ns", sa.BigInteger, nullable=False),
)

# Ids of flushed usage batches, written in the same transaction as their rows: a batch replayed
# from the spool after an ambiguous failure (commit sent, answer lost) is applied at most once.
usage_batches = sa.Table(
    "usage_batches",
    metadata,
    sa.Column("batch_id", sa.String(36), primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)

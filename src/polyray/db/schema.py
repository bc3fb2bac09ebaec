"""Every table (SQLAlchemy Core): tenancy's (clients, keys, usage; migration 0001) and the task
heads' (migration 0002). The schema is versioned by the Alembic migrations in ``migrations/``;
this module is what the code queries, and a test checks the two agree. Each table has one
writer: ``tenancy.store`` and ``tenancy.ledger`` for the first four, ``heads.store`` for the rest."""

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

# -- task heads (migration 0002) ---------------------------------------------------------------

# One row per (owner, name, model version): a head's parameters fit one embedding space only, so
# retraining on a new model version adds a row with the same name instead of replacing the old
# one (clients still on the old version keep their head). ``artifact`` is the npz of HeadParams,
# read only when a head is loaded for serving (never by the listing queries).
heads = sa.Table(
    "heads",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("owner", sa.String(63), nullable=False),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("progress", sa.Float, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("dim_in", sa.Integer, nullable=False),
    sa.Column("dim_out", sa.Integer, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),  # JSON list
    sa.Column("options", sa.Text, nullable=False),  # JSON object
    sa.Column("metrics", sa.Text, nullable=False),  # JSON object
    sa.Column("num_examples", sa.Integer, nullable=False),
    sa.Column("artifact", sa.LargeBinary, nullable=True),
    sa.Column("artifact_sha256", sa.String(64), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("owner", "name", "model_name", "model_version", name="uq_heads_owner_name_model"),
)

# Clients other than the owner that may apply a head (by ``owner/name``).
head_shares = sa.Table(
    "head_shares",
    metadata,
    sa.Column("head_id", sa.String(40), sa.ForeignKey("heads.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("client", sa.String(63), primary_key=True),
    sa.Index("ix_head_shares_client", "client"),
)

# A head's training examples, kept so it can be retrained on a new model version; ``label`` is
# JSON (a string, a number, a list of strings, or null).
head_examples = sa.Table(
    "head_examples",
    metadata,
    sa.Column("head_id", sa.String(40), sa.ForeignKey("heads.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("label", sa.Text, nullable=False),
)

# A single row (id 1) whose counter every committed change to the three head tables increments,
# in the same transaction: a server polls it (one primary-key read) to notice heads created,
# trained, shared or deleted by another process, without trusting clocks across machines.
head_generation = sa.Table(
    "head_generation",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("generation", sa.BigInteger, nullable=False),
)

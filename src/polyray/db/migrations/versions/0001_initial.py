"""Clients, API keys, per-minute usage and applied usage batches.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clients",
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
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("client_id", sa.Integer, sa.ForeignKey("clients.id"), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "usage_minutes",
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
    op.create_table(
        "usage_batches",
        sa.Column("batch_id", sa.String(36), primary_key=True),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("usage_batches")
    op.drop_table("usage_minutes")
    op.drop_table("api_keys")
    op.drop_table("clients")

"""Task heads: heads, their shares, their training examples, and the heads' change counter.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "heads",
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
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("options", sa.Text, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("num_examples", sa.Integer, nullable=False),
        sa.Column("artifact", sa.LargeBinary, nullable=True),
        sa.Column("artifact_sha256", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("owner", "name", "model_name", "model_version", name="uq_heads_owner_name_model"),
    )
    op.create_table(
        "head_shares",
        sa.Column("head_id", sa.String(40), sa.ForeignKey("heads.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("client", sa.String(63), primary_key=True),
    )
    op.create_index("ix_head_shares_client", "head_shares", ["client"])
    op.create_table(
        "head_examples",
        sa.Column("head_id", sa.String(40), sa.ForeignKey("heads.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
    )
    generation = op.create_table(
        "head_generation",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(generation, [{"id": 1, "generation": 0}])


def downgrade() -> None:
    op.drop_table("head_generation")
    op.drop_table("head_examples")
    op.drop_index("ix_head_shares_client", table_name="head_shares")
    op.drop_table("head_shares")
    op.drop_table("heads")

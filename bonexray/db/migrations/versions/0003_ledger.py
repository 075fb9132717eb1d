"""The ledger: leases on studies, partial results, idempotent batch timings, each job's
queue, and the database's identity that task messages carry.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    identity = op.create_table(
        "database_identity",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_database_identity")),
    )
    now = datetime.now(timezone.utc)
    if op.get_bind().dialect.name == "sqlite":
        now = now.replace(tzinfo=None)
    op.bulk_insert(identity, [{"id": str(uuid.uuid4()), "created_at": now}])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("queue", sa.String(255), nullable=True))
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("partial", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("claimed_by", sa.String(255), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", _timestamp(), nullable=True))
        batch.add_column(sa.Column("sent_at", _timestamp(), nullable=True))
        batch.add_column(sa.Column("decoding", sa.Text(), nullable=True))
        batch.add_column(sa.Column("crashes", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.create_index(op.f("ix_studies_status_heartbeat_at"), ["status", "heartbeat_at"])
    with op.batch_alter_table("batch_stats") as batch:
        batch.add_column(sa.Column("chunk", sa.String(64), nullable=True))
        batch.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        batch.create_unique_constraint(op.f("uq_batch_stats_job_id_chunk_seq"),
                                       ["job_id", "chunk", "seq"])


def downgrade() -> None:
    with op.batch_alter_table("batch_stats") as batch:
        batch.drop_constraint(op.f("uq_batch_stats_job_id_chunk_seq"), type_="unique")
        batch.drop_column("seq")
        batch.drop_column("chunk")
    with op.batch_alter_table("studies") as batch:
        batch.drop_index(op.f("ix_studies_status_heartbeat_at"))
        for column in ("crashes", "decoding", "sent_at", "heartbeat_at", "claimed_by",
                       "partial"):
            batch.drop_column(column)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("queue")
    op.drop_table("database_identity")

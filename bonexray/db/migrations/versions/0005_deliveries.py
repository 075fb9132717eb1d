"""Deliveries: each study's SR sent to a PACS destination, once per study key, model and
destination, with its attempts and last error.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sr_uid", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"],
                                name=op.f("fk_deliveries_model_id_models")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="SET NULL",
                                name=op.f("fk_deliveries_job_id_jobs")),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="SET NULL",
                                name=op.f("fk_deliveries_study_id_studies")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.UniqueConstraint("key", "model_id", "destination",
                            name=op.f("uq_deliveries_key_model_id_destination")),
    )
    op.create_index(op.f("ix_deliveries_job_id"), "deliveries", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_deliveries_job_id"), table_name="deliveries")
    op.drop_table("deliveries")

"""Initial schema: models, jobs, studies, views, batch_stats.

Revision ID: 0001
Revises:
Create Date: 2025-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")),
        sa.UniqueConstraint("sha256", name=op.f("uq_models_sha256")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("root", sa.Text(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("options", JSON, nullable=False),
        sa.Column("n_studies", sa.Integer(), nullable=False),
        sa.Column("n_views", sa.Integer(), nullable=False),
        sa.Column("finished_at", _timestamp(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"],
                                name=op.f("fk_jobs_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_model_id"), "jobs", ["model_id"])
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("body_part", sa.String(64), nullable=True),
        sa.Column("patient", sa.String(255), nullable=True),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("n_views", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("prediction", sa.String(16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("finished_at", _timestamp(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE",
                                name=op.f("fk_studies_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("job_id", "path", name=op.f("uq_studies_job_id_path")),
    )
    op.create_index(op.f("ix_studies_job_id_status"), "studies", ["job_id", "status"])
    op.create_table(
        "views",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("prob", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE",
                                name=op.f("fk_views_study_id_studies")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_views")),
        sa.UniqueConstraint("study_id", "path", name=op.f("uq_views_study_id_path")),
    )
    op.create_table(
        "batch_stats",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(255), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("n_views", sa.Integer(), nullable=False),
        sa.Column("decode_ms", sa.Float(), nullable=False),
        sa.Column("infer_ms", sa.Float(), nullable=False),
        sa.Column("write_ms", sa.Float(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE",
                                name=op.f("fk_batch_stats_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_stats")),
    )
    op.create_index(op.f("ix_batch_stats_job_id"), "batch_stats", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_batch_stats_job_id"), table_name="batch_stats")
    op.drop_table("batch_stats")
    op.drop_table("views")
    op.drop_index(op.f("ix_studies_job_id_status"), table_name="studies")
    op.drop_table("studies")
    op.drop_index(op.f("ix_jobs_model_id"), table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("models")

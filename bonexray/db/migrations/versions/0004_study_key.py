"""Studies get a key and views a source, not "a folder path" and "a file path": image folders
keep their paths there, DICOM studies are keyed by StudyInstanceUID and body part. DICOM
identifiers get their own columns (UIDs and the accession number; never names or dates).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# SQLite's batch mode recreates the table: a unique constraint on a column renamed in the
# same batch is lost, so each rename and its constraint are two batches.
def _rename(table: str, old: str, new: str, first: str) -> None:
    with op.batch_alter_table(table) as batch:
        batch.drop_constraint(op.f(f"uq_{table}_{first}_{old}"), type_="unique")
        batch.alter_column(old, new_column_name=new, existing_type=sa.Text(),
                           existing_nullable=False)
    with op.batch_alter_table(table) as batch:
        batch.create_unique_constraint(op.f(f"uq_{table}_{first}_{new}"), [first, new])


def upgrade() -> None:
    _rename("studies", "path", "key", "job_id")
    _rename("views", "path", "source", "study_id")
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("study_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("accession", sa.String(64), nullable=True))
    with op.batch_alter_table("views") as batch:
        batch.add_column(sa.Column("sop_uid", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("views") as batch:
        batch.drop_column("sop_uid")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("accession")
        batch.drop_column("study_uid")
    _rename("views", "source", "path", "study_id")
    _rename("studies", "key", "path", "job_id")

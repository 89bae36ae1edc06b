"""uploads (images sent to edit: init images and masks) and, on jobs, the upload an edit starts
from, its mask and its strength

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner", sa.String(length=80), nullable=False),
        sa.Column("storage_key", sa.String(length=512), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
    )
    op.create_index(op.f("ix_uploads_owner"), "uploads", ["owner"])
    op.create_index(op.f("ix_uploads_created_at"), "uploads", ["created_at"])
    # Plain columns (no foreign keys): on SQLite, adding a constraint would rebuild the jobs
    # table and its triggers; an upload is deleted only when no job names it.
    op.add_column("jobs", sa.Column("init_upload_id", sa.Uuid(), nullable=True))
    op.add_column("jobs", sa.Column("mask_upload_id", sa.Uuid(), nullable=True))
    op.add_column("jobs", sa.Column("strength", sa.Float(), nullable=True))
    op.create_index(op.f("ix_jobs_init_upload_id"), "jobs", ["init_upload_id"])
    op.create_index(op.f("ix_jobs_mask_upload_id"), "jobs", ["mask_upload_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_mask_upload_id"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_init_upload_id"), table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("strength")
        batch.drop_column("mask_upload_id")
        batch.drop_column("init_upload_id")
    op.drop_index(op.f("ix_uploads_created_at"), table_name="uploads")
    op.drop_index(op.f("ix_uploads_owner"), table_name="uploads")
    op.drop_table("uploads")

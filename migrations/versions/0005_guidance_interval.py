"""guidance_interval on jobs (the noise levels at which classifier-free guidance applies), and a
partial index on batches still running (the reaper's pass)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("guidance_interval", sa.JSON(none_as_null=True), nullable=True))
    op.create_index(
        "ix_batches_unfinished",
        "batches",
        ["created_at"],
        sqlite_where=sa.text("finished_at IS NULL"),
        postgresql_where=sa.text("finished_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_batches_unfinished", table_name="batches")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("guidance_interval")

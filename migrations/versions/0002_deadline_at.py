"""deadline_at on jobs and training runs (the time limit of the current claim), and an index
on (status, published_at) for the relay

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("jobs", "training_runs")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
        op.create_index(f"ix_{table}_status_published_at", table, ["status", "published_at"])


def downgrade() -> None:
    for table in TABLES:
        op.drop_index(f"ix_{table}_status_published_at", table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("deadline_at")

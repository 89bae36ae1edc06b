"""worker presence says what a worker serves: its numeric precision and the model versions it
holds in memory

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("worker_presence", sa.Column("precision", sa.String(length=8), nullable=True))
    op.add_column("worker_presence", sa.Column("models", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("worker_presence") as batch:
        batch.drop_column("models")
        batch.drop_column("precision")

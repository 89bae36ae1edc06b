"""many models at once: a model version can be retired or be the canary of the default traffic,
and a job records how its version was picked (named, default or canary)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CANARY = sa.text("canary_percent > 0")


def upgrade() -> None:
    op.add_column(
        "model_versions", sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "model_versions",
        sa.Column("canary_percent", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.create_index(
        "uq_model_versions_canary_kind",
        "model_versions",
        ["kind"],
        unique=True,
        sqlite_where=CANARY,
        postgresql_where=CANARY,
    )
    # A plain column, as 0007's: on SQLite a constraint would rebuild jobs and its triggers.
    op.add_column("jobs", sa.Column("model_pick", sa.String(length=16), nullable=True))


def downgrade() -> None:
    # SQLite (3.35+) drops a column in place, keeping the jobs table's triggers.
    op.drop_column("jobs", "model_pick")
    op.drop_index("uq_model_versions_canary_kind", table_name="model_versions")
    op.drop_column("model_versions", "canary_percent")
    op.drop_column("model_versions", "retired_at")

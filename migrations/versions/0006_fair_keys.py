"""the fair order stored: jobs.fair_key (each job's start tag, given by a trigger), fair_owners
(each owner's next start), and partial indexes on the queued rows in that order, so that claims,
queue positions and batch fills are index range scans instead of a window over the queue; an
index on (owner, status, created_at) for the per-caller cap and a caller's pages

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from core.db import fair_keys

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("fair_key", sa.Float(), nullable=True))
    op.create_table(
        "fair_owners",
        sa.Column("owner", sa.String(length=80), nullable=False),
        sa.Column("last_start", sa.Float(), nullable=False),
        sa.Column("next_start", sa.Float(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("owner", name=op.f("pk_fair_owners")),
    )
    op.create_index(op.f("ix_fair_owners_last_start"), "fair_owners", ["last_start"])
    op.create_index(
        "ix_jobs_queued_fair",
        "jobs",
        ["fair_key", "created_at", "id"],
        sqlite_where=QUEUED,
        postgresql_where=QUEUED,
    )
    op.create_index(
        "ix_jobs_queued_kind",
        "jobs",
        ["model_version_id", "sampler", "steps", "width", "height", "fair_key", "created_at", "id"],
        sqlite_where=QUEUED,
        postgresql_where=QUEUED,
    )
    op.create_index("ix_jobs_owner_status_created_at", "jobs", ["owner", "status", "created_at"])
    fair_keys.create_triggers(op.get_bind())


def downgrade() -> None:
    fair_keys.drop_triggers(op.get_bind())
    op.drop_index("ix_jobs_owner_status_created_at", table_name="jobs")
    op.drop_index("ix_jobs_queued_kind", table_name="jobs")
    op.drop_index("ix_jobs_queued_fair", table_name="jobs")
    op.drop_index(op.f("ix_fair_owners_last_start"), table_name="fair_owners")
    op.drop_table("fair_owners")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("fair_key")

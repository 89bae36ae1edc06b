"""alembic's entry point: migrate the database named by DQ_DATABASE_URL (or by the URL that
``core.db.migrate`` passes in) to the schema of ``core.db.models``."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from core.db.models import Base
from core.db.session import make_engine
from core.runtime.settings import Settings

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=True,
        compare_type=True,
        compare_server_default=True,
    )


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    url = config.attributes.get("url") or Settings.from_env().database_url
    if context.is_offline_mode():
        _configure(url=url)
        with context.begin_transaction():
            context.run_migrations()
        return
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _configure(connection=conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


run_migrations()

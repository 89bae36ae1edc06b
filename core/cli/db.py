"""``dq db``: migrate the job database and show its schema revision; also the migration step
and the schema check that ``dq web`` and ``dq serve`` run before they start."""

from __future__ import annotations

import click

from core.cli._common import database_error, fail, load_settings


@click.group()
def db() -> None:
    """The job database: apply migrations, show the schema revision."""


def migrate_schema(url: str, revision: str = "head") -> None:
    """Apply the migrations; any database error becomes one line naming DQ_DATABASE_URL."""
    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    from core.db import check_database, make_engine, migrate

    engine = make_engine(url)
    try:
        check_database(engine)
    except OperationalError as e:
        raise database_error(url, e) from None
    finally:
        engine.dispose()
    try:
        migrate.upgrade(url, revision)
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise fail(
            f"migrating the database (DQ_DATABASE_URL) failed: {reason}; if its tables were not "
            "made by `dq db upgrade`, start from an empty database"
        ) from None


def require_current_schema(url: str) -> None:
    """One line naming the fix when the schema is not at the code's revision."""
    from sqlalchemy.exc import OperationalError

    from core.db import migrate

    try:
        current = migrate.current_revision(url)
    except OperationalError as e:
        raise database_error(url, e) from None
    head = migrate.head_revision()
    if current != head:
        raise fail(
            f"the database schema is at revision {current or '(empty)'}, this code needs {head}: "
            "run `dq db upgrade` first (in Kubernetes, the dq-migrate Job)"
        )


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Create or migrate the schema of DQ_DATABASE_URL."""
    from sqlalchemy.exc import OperationalError

    from core.db import migrate

    settings = load_settings()
    migrate_schema(settings.database_url, revision)
    try:
        current = migrate.current_revision(settings.database_url)
    except OperationalError as e:
        raise database_error(settings.database_url, e) from None
    click.echo(f"database is at revision {current}")


@db.command("current")
def db_current() -> None:
    """Print the schema revision of DQ_DATABASE_URL and whether it is the newest."""
    from sqlalchemy.exc import OperationalError

    from core.db import migrate

    settings = load_settings()
    try:
        current = migrate.current_revision(settings.database_url)
    except OperationalError as e:
        raise database_error(settings.database_url, e) from None
    head = migrate.head_revision()
    state = "up to date" if current == head else f"behind {head}; run `dq db upgrade`"
    click.echo(f"{current or '(empty)'} ({state})")

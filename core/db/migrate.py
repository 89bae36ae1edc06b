"""Apply the alembic migrations in ``migrations/`` from Python (``dq db upgrade`` calls this)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from core.db.session import make_engine
from core.runtime.settings import Settings

# migrations/ sits beside core/ in the source tree and in the images (deploy/ copies both).
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(f"the alembic migrations are missing: {MIGRATIONS_DIR}")
    cfg = Config(str(MIGRATIONS_DIR.parent / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at ``url`` (default: DQ_DATABASE_URL) up to ``revision``."""
    command.upgrade(alembic_config(url or Settings.from_env().database_url), revision)


def downgrade(url: str | None, revision: str) -> None:
    command.downgrade(alembic_config(url or Settings.from_env().database_url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    """The revision the database is at, or None when it has never been migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()

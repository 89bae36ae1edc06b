"""alembic migrations: they build the schema, agree with the models, and go back down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from core.db import Base, make_engine, migrate

TABLES = {
    "admin_sessions",
    "api_tokens",
    "audit_events",
    "batches",
    "disabled_webhook_urls",
    "fair_owners",
    "job_events",
    "throughput_samples",
    "webhook_attempts",
    "webhook_deliveries",
    "webhook_secrets",
    "worker_presence",
    "status_count_deltas",
    "status_counts",
    "images",
    "jobs",
    "model_versions",
    "training_metrics",
    "training_runs",
    "uploads",
}


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_builds_the_schema_on_an_empty_database(db_url: str) -> None:
    assert migrate.current_revision(db_url) is None
    migrate.upgrade(db_url)
    assert tables(db_url) == TABLES | {"alembic_version"}
    assert migrate.current_revision(db_url) == migrate.head_revision()
    migrate.upgrade(db_url)  # a second upgrade is a no-op
    assert migrate.current_revision(db_url) == migrate.head_revision()


def test_models_and_migrations_agree(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_to_base_removes_every_table_and_upgrade_rebuilds(db_url: str) -> None:
    migrate.upgrade(db_url)
    migrate.downgrade(db_url, "base")
    assert tables(db_url) <= {"alembic_version"}
    assert migrate.current_revision(db_url) is None
    migrate.upgrade(db_url)
    assert tables(db_url) == TABLES | {"alembic_version"}


def test_dq_db_upgrade_creates_the_embedded_database_under_var(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    result = subprocess.run(
        [sys.executable, "-m", "core.cli", "db", "upgrade"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"revision {migrate.head_revision()}" in result.stdout
    db = tmp_path / "var" / "dq.sqlite3"
    assert db.is_file()
    assert tables(f"sqlite:///{db}") == TABLES | {"alembic_version"}


def test_dq_db_upgrade_on_tables_it_did_not_make_fails_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    engine = make_engine(url)
    Base.metadata.create_all(engine)  # tables, but no alembic_version
    engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    result = subprocess.run(
        [sys.executable, "-m", "core.cli", "db", "upgrade"],
        cwd=tmp_path,
        env={**env, "DQ_DATABASE_URL": url, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("dq: error: migrating the database (DQ_DATABASE_URL) failed: ")
    assert "already exists" in line

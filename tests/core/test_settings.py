"""The settings object: embedded defaults, DQ_* parsing, and one clear line per bad value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.runtime.settings import (
    Settings,
    SettingsError,
    setting_names,
    sqlite_path,
    storage_location,
)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_embedded_topology_and_need_no_server() -> None:
    s = Settings.from_env({})
    assert s.database_url.startswith("sqlite:///var/")
    assert s.broker_url.startswith("sqla+sqlite:///var/")
    assert storage_location(s.storage_url) == ("file", "var/objects")
    assert {p.as_posix() for p in s.local_paths()} == {"var", "var/objects"}
    # The broker never redelivers a task that is still inside its hard time limit.
    assert s.broker_visibility_timeout > max(s.job_time_limit_seconds, s.train_time_limit_seconds)


def test_environment_values_are_parsed_into_types() -> None:
    s = Settings.from_env(
        {
            "DQ_DATABASE_URL": "postgresql+psycopg://dq:pw@db:5432/dq",
            "DQ_BROKER_URL": "redis://redis:6379/0",
            "DQ_STORAGE_URL": "s3://images/prod",
            "DQ_S3_ENDPOINT_URL": "http://minio:9000",
            "DQ_MAX_STEPS": "50",
            "DQ_JOB_LEASE_SECONDS": "12.5",
            "DQ_DEBUG": "yes",
            "DQ_DEVICE": "cuda:1",
            "UNRELATED": "ignored",
        }
    )
    assert (s.max_steps, s.job_lease_seconds, s.debug, s.device) == (50, 12.5, True, "cuda:1")
    assert storage_location(s.storage_url) == ("s3", "images/prod")
    assert s.public_dict()["DQ_DATABASE_URL"] == "postgresql+psycopg://dq:***@db:5432/dq"
    assert s.database_replica_url is None


def test_a_replica_of_a_postgresql_primary_is_read_and_its_password_masked() -> None:
    s = Settings.from_env(
        {
            "DQ_DATABASE_URL": "postgresql+psycopg://dq:pw@db/dq",
            "DQ_DATABASE_REPLICA_URL": "postgresql+psycopg://dq:pw@replica/dq",
        }
    )
    assert s.database_replica_url == "postgresql+psycopg://dq:pw@replica/dq"
    assert s.public_dict()["DQ_DATABASE_REPLICA_URL"] == "postgresql+psycopg://dq:***@replica/dq"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DQ_MAX_STEPS": "many"}, "DQ_MAX_STEPS='many' is not valid: must be a positive integer"),
        ({"DQ_MAX_STEPS": "0"}, "DQ_MAX_STEPS='0' is not valid: must be a positive integer"),
        ({"DQ_JOB_LEASE_SECONDS": "-1"}, "DQ_JOB_LEASE_SECONDS='-1' is not valid"),
        ({"DQ_DEBUG": "maybe"}, "DQ_DEBUG='maybe' is not valid: must be true or false"),
        ({"DQ_DATABASE_URL": "mysql://x/y"}, "DQ_DATABASE_URL='mysql://x/y' is not valid"),
        ({"DQ_BROKER_URL": "amqp://guest@x//"}, "DQ_BROKER_URL='amqp://guest@x//' is not valid"),
        # A replica is of a PostgreSQL primary, and its password stays out of the message.
        (
            {"DQ_DATABASE_REPLICA_URL": "postgresql+psycopg://dq:pw@replica/dq"},
            "DQ_DATABASE_REPLICA_URL='postgresql+psycopg://dq:***@replica/dq' is not valid",
        ),
        (
            {"DQ_DATABASE_URL": "postgresql://db/dq", "DQ_DATABASE_REPLICA_URL": "sqlite:///r"},
            "DQ_DATABASE_REPLICA_URL='sqlite:///r' is not valid: name a postgresql+psycopg://",
        ),
        ({"DQ_STORAGE_URL": "ftp://x"}, "DQ_STORAGE_URL='ftp://x' is not valid"),
        ({"DQ_STORAGE_URL": "s3://"}, "DQ_STORAGE_URL='s3://' is not valid: name a bucket"),
        ({"DQ_S3_ENDPOINT_URL": "minio:9000"}, "DQ_S3_ENDPOINT_URL='minio:9000' is not valid"),
        ({"DQ_DEVICE": "tpu"}, "DQ_DEVICE='tpu' is not valid: use cpu or cuda"),
        ({"DQ_TRUSTED_PROXY_HOPS": "-1"}, "DQ_TRUSTED_PROXY_HOPS='-1' is not valid: must be 0"),
        ({"DQ_TRUSTED_PROXY_HOPS": "9"}, "DQ_TRUSTED_PROXY_HOPS must be from 0 to 5"),
        ({"DQ_DB_STATEMENT_TIMEOUT_SECONDS": "x"}, "DQ_DB_STATEMENT_TIMEOUT_SECONDS='x'"),
        ({"DQ_DB_POOL_SIZE": "0"}, "DQ_DB_POOL_SIZE='0' is not valid"),
        ({"DQ_MAX_QUEUED_JOBS": "0"}, "DQ_MAX_QUEUED_JOBS='0' is not valid"),
        ({"DQ_WORKER_HANG_GRACE_SECONDS": "0"}, "DQ_WORKER_HANG_GRACE_SECONDS='0' is not valid"),
        ({"DQ_QUEUE_SNAPSHOT_SECONDS": "-1"}, "DQ_QUEUE_SNAPSHOT_SECONDS='-1' is not valid: must"),
        ({"DQ_QUEUE_SNAPSHOT_SECONDS": "nan"}, "DQ_QUEUE_SNAPSHOT_SECONDS='nan' is not valid"),
    ],
)
def test_a_bad_value_names_its_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_zero_means_none_where_the_help_says_so() -> None:
    s = Settings.from_env({"DQ_TRUSTED_PROXY_HOPS": "0", "DQ_DB_STATEMENT_TIMEOUT_SECONDS": "0"})
    assert (s.trusted_proxy_hops, s.db_statement_timeout_seconds) == (0, 0)


def test_every_setting_has_a_variable_and_a_description() -> None:
    described = Settings.describe()
    assert {name for name, _, _ in described} == setting_names()
    assert all(name.startswith("DQ_") and len(help) > 10 for name, _, help in described)


def test_overrides_win_and_unknown_ones_are_refused() -> None:
    s = Settings.from_env({"DQ_MAX_STEPS": "10"}, max_steps=20)
    assert s.max_steps == 20
    with pytest.raises(TypeError, match="unknown settings: nope"):
        Settings.from_env({}, nope=1)


def test_sqlite_paths() -> None:
    assert sqlite_path("sqlite:///var/dq.sqlite3") == Path("var/dq.sqlite3")
    assert sqlite_path("sqla+sqlite:////abs/b.db") == Path("/abs/b.db")
    assert sqlite_path("sqlite://") is None
    assert sqlite_path("postgresql+psycopg://x/y") is None


def run_dq(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DQ_DATABASE_URL": "oracle://x"}, "DQ_DATABASE_URL='oracle://x' is not valid"),
        ({"DQ_MAX_IMAGES_PER_JOB": "x"}, "DQ_MAX_IMAGES_PER_JOB='x' is not valid"),
        (
            {"DQ_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/none"},
            "cannot reach the database at postgresql+psycopg://postgres@127.0.0.1:1/none "
            "(DQ_DATABASE_URL)",
        ),
    ],
)
def test_dq_db_upgrade_fails_in_one_line_on_a_bad_setting(
    env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    result = run_dq("db", "upgrade", env=env, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dq: error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "var").exists()


def test_the_data_plane_imports_no_torch() -> None:
    """The web image has no torch: settings, db, migrations and storage must not need it."""
    code = (
        "import sys, core.runtime.settings, core.db, core.db.migrate, core.storage, core.cli; "
        "print(sorted(m for m in ('torch', 'flask', 'celery') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_a_secret_key_every_process_shares_one_kept_under_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env({"DQ_SECRET_KEY": "given"}).effective_secret_key == "given"
    assert not (tmp_path / "var").exists()
    first = Settings.from_env({}).effective_secret_key
    assert len(first) == 64
    assert (tmp_path / "var" / "secret_key").stat().st_mode & 0o777 == 0o600
    code = (
        "from core.runtime.settings import Settings; "
        "print(Settings.from_env({}).effective_secret_key)"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.stdout.strip() == first
    assert [p.name for p in (tmp_path / "var").iterdir()] == ["secret_key"]


def test_the_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in setting_names())

"""The real services the tests use: PostgreSQL, Redis and moto's S3 server.

Outside CI a missing service skips the tests that need it. In CI (``CI=true``) it fails them:
a test that needs a service never silently skips there.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import pytest

POSTGRES_URL = os.environ.get(
    "DQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("DQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(service: str, reason: object) -> NoReturn:
    message = f"{service} is not reachable: {reason}"
    if in_ci():
        pytest.fail(message + " (CI=true: services are required)", pytrace=False)
    pytest.skip(message)


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema in the test database; yields a URL whose search_path points at it.

    Every test gets its own schema, so tests, a worker subprocess they start, and a concurrent
    run on the same server never see each other's rows.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    schema = f"dq_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as e:
        admin.dispose()
        unavailable("PostgreSQL", str(e.orig).splitlines()[0] if e.orig else e)
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        from core.db import dispose_engines

        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def require_redis(url: str = REDIS_URL) -> str:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        unavailable("Redis", e)
    return url


@contextmanager
def empty_redis(url: str = REDIS_URL) -> Iterator[Any]:
    """A client on ``url``'s database, flushed before and after. The tests that need a broker
    use the database DQ_TEST_REDIS_URL names, so that parallel runs can each pick their own."""
    import redis

    require_redis(url)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()

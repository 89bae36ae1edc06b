"""Engines and sessions: one engine per process and URL, a session per unit of work."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.runtime.settings import Settings, SettingsError, sqlite_path

_engines: dict[tuple[str, bool], Engine] = {}
_lock = threading.Lock()


def make_engine(
    url: str,
    connect_timeout: int = 10,
    statement_timeout: int = 30,
    pool_size: int = 10,
    *,
    autocommit: bool = False,
) -> Engine:
    """A new engine for ``url``. SQLite gets WAL, foreign keys and a busy timeout, so that the
    web process and a worker process can share one file. PostgreSQL connections give up
    connecting after ``connect_timeout`` seconds and cancel statements running longer than
    ``statement_timeout`` seconds (0: none), so a dead or wedged database cannot hang a worker
    or a web request forever.

    The pool keeps ``pool_size`` PostgreSQL connections (DQ_DB_POOL_SIZE) and opens as many
    more when that many are in use at once, closing each of those when it is given back. A
    connection costs both processes a few milliseconds to open, so a pool smaller than what a
    process uses at once opens and closes one every few requests: under bench/bench_web.py's
    polls, web processes with SQLAlchemy's default of 5 opened about 20 connections a second
    (docs/QUEUE.md).

    ``autocommit``: an engine for reads only (:func:`get_read_engine`). On PostgreSQL its
    connections are in autocommit from the moment they open and stay so, rather than switched
    into it and back on every checkout, as ``read_only_engine``'s execution option does."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SettingsError(f"DQ_DATABASE_URL={url!r} is not a database URL") from None
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs["pool_timeout"] = max(connect_timeout, 5)
        kwargs["pool_size"] = kwargs["max_overflow"] = pool_size
        if autocommit:
            # Nothing to roll back on return: each statement was its own transaction.
            kwargs.update(isolation_level="AUTOCOMMIT", pool_reset_on_return=None)
        # TCP keepalives notice a server that vanished without closing the connection.
        kwargs["connect_args"] = {
            "connect_timeout": connect_timeout,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
    try:
        engine = create_engine(url, **kwargs)
    except ModuleNotFoundError as e:
        raise SettingsError(
            f"DQ_DATABASE_URL={url!r} needs a driver that is missing: {e}"
        ) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
    else:
        _ping_idle_connections(engine)
        if statement_timeout:
            event.listen(engine, "connect", _statement_timeout(statement_timeout))
    return engine


# A connection back in the pool for less than this is handed out again without a ping, as
# HikariCP's aliveBypassWindowMs does (500 ms there too).
ALIVE_BYPASS_SECONDS = 0.5
_CHECKED_IN = "dq_checked_in"


def _ping_idle_connections(engine: Engine) -> None:
    """Connections die when PostgreSQL restarts: test one on checkout, rather than failing the
    request that gets it, when it has sat in the pool for ALIVE_BYPASS_SECONDS or more. A
    connection used a moment ago is left alone, which saves a round trip on every request of a
    busy process; should it have died in that moment, its statement fails, and SQLAlchemy then
    replaces every connection of the pool (the request that met it answers 503). A failed ping
    makes the pool connect afresh (pool_pre_ping pings on every checkout instead)."""
    dialect = engine.dialect

    def checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info[_CHECKED_IN] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop(_CHECKED_IN, None)
        if since is None or time.monotonic() - since < ALIVE_BYPASS_SECONDS:
            return  # just connected, or back a moment ago
        try:
            alive = dialect.do_ping(dbapi_connection)
        except Exception:
            alive = False
        if not alive:
            raise DisconnectionError("the connection did not answer a ping")

    event.listen(engine, "checkin", checked_in)
    event.listen(engine, "checkout", checkout)


def _statement_timeout(seconds: int) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # A session setting, not part of the URL: the URL's own `options` stay as they are.
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET statement_timeout = {int(seconds * 1000)}")
            # A process frozen inside a transaction (SIGSTOP, a VM pause) would hold its row
            # locks, and block the reaper, until it woke; the server ends such a session.
            cursor.execute(f"SET idle_in_transaction_session_timeout = {int(seconds * 2000)}")
        dbapi_connection.autocommit = autocommit

    return on_connect


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling is turned off; we issue BEGIN ourselves (below).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # BEGIN IMMEDIATE takes the write lock at the start, so two processes that read then write
    # wait for each other instead of failing with "database is locked" at the write. Read-only
    # work (see read_only_engine) runs in autocommit, like PostgreSQL's read engine: each
    # statement reads a consistent, committed snapshot and, under WAL, never waits for a writer.
    if not conn.get_execution_options().get(READ_ONLY_OPTION):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


READ_ONLY_OPTION = "dq_read_only"


def read_only_engine(engine: Engine) -> Engine:
    """The same pool for work that only reads, such as polling a job: autocommit on both
    backends, so no BEGIN/ROLLBACK round trips and, on SQLite, no write lock. Each statement
    sees committed data; do not write through it."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine.execution_options(**{READ_ONLY_OPTION: True})


def get_engine(settings: Settings | None = None, url: str | None = None) -> Engine:
    """The process-wide engine for the settings' database URL (or ``url``)."""
    if url is None:
        settings = settings or Settings.from_env()
        url = settings.database_url
    return _shared_engine(url, *(_engine_options(settings) if settings is not None else ()))


def get_read_engine(settings: Settings) -> Engine:
    """The process-wide engine for work that only reads (the web's GET requests). On
    PostgreSQL, a pool of its own whose connections stay in autocommit (``make_engine``'s
    ``autocommit``): a poll checks one out and back with no switching, which cost about a tenth of
    the poll's own work in the web process. On SQLite, the same pool as :func:`get_engine`'s
    (a second pool of the same file gains nothing), through :func:`read_only_engine`."""
    engine = get_engine(settings)
    if engine.dialect.name != "postgresql":
        return read_only_engine(engine)
    return _shared_engine(settings.database_url, *_engine_options(settings), autocommit=True)


# A reader that has the primary to fall back to gains nothing by waiting long for a replica.
REPLICA_CONNECT_TIMEOUT_SECONDS = 2


def get_replica_engine(settings: Settings) -> Engine | None:
    """The process-wide engine of DQ_DATABASE_REPLICA_URL, or None when no replica is set: for
    reads only (a standby takes no writes), in autocommit like :func:`get_read_engine`'s. It
    gives up connecting after at most REPLICA_CONNECT_TIMEOUT_SECONDS."""
    url = settings.database_replica_url
    if url is None:
        return None
    connect_timeout = min(settings.db_connect_timeout_seconds, REPLICA_CONNECT_TIMEOUT_SECONDS)
    return _shared_engine(url, *_engine_options(settings, connect_timeout), autocommit=True)


def _engine_options(settings: Settings, connect_timeout: int | None = None) -> tuple[int, ...]:
    """:func:`make_engine`'s connect timeout (the settings' unless given), statement timeout
    and pool size, from the settings."""
    if connect_timeout is None:
        connect_timeout = settings.db_connect_timeout_seconds
    return connect_timeout, settings.db_statement_timeout_seconds, settings.db_pool_size


def _shared_engine(url: str, *options: int, autocommit: bool = False) -> Engine:
    key = (url, autocommit)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(url, *options, autocommit=autocommit)
        return engine


def dispose_engines() -> None:
    """Close every pooled connection, e.g. after fork or at the end of a test."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits when the block ends and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


def check_database(engine: Engine) -> None:
    """Raise OperationalError when the database cannot be reached (for readiness checks)."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


__all__ = [
    "OperationalError",
    "check_database",
    "dispose_engines",
    "get_engine",
    "get_read_engine",
    "get_replica_engine",
    "make_engine",
    "read_only_engine",
    "session_factory",
    "session_scope",
]

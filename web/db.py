"""One database session per request, opened on first use and closed when the request ends.

A view that writes calls ``commit()`` itself, so what a response reports has been committed; a
request that ends with an error rolls back, leaving nothing half-written.

GET and HEAD requests only read, and a client polls its job twice a second, so reads are kept
cheap:

- on PostgreSQL they run in autocommit mode: each statement sees what was committed, and no
  BEGIN and ROLLBACK round trips are paid;
- on SQLite likewise (no BEGIN, so no lock that a writer waits for under WAL); a read-only view
  still ends its session's transaction as soon as it has what it needs (:func:`end_reads`).

With DQ_DATABASE_REPLICA_URL, polls, lists and pages read through :func:`replica_read`, from a
streaming replica, and fall back to the primary for what it lacks yet or cannot answer. Who is
calling (tokens, sign-ins) is always read from the primary: a sign-in a replica has not seen
yet would otherwise sign the browser out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, g, request
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from core.db.session import get_read_engine, get_replica_engine
from core.runtime.settings import Settings
from web.services import Replica, services

log = logging.getLogger(__name__)

READ_METHODS = ("GET", "HEAD")
# After the replica fails, reads skip it this long, and the failure is logged once for them.
REPLICA_RETRY_SECONDS = 30.0

T = TypeVar("T")


def replica(settings: Settings) -> Replica | None:
    """The replica of DQ_DATABASE_REPLICA_URL, read like the primary by GET requests
    (:func:`read_engine`); None without one."""
    engine = get_replica_engine(settings)
    return None if engine is None else Replica(engine)


def read_engine(settings: Settings) -> Engine:
    """The engine that GET requests use: in autocommit, without write locks or extra round
    trips (:func:`core.db.session.get_read_engine`)."""
    return get_read_engine(settings)


def get_session() -> Session:
    if "db" not in g:
        svc = services()
        engine = svc.read_engine if request.method in READ_METHODS else svc.engine
        # expire_on_commit=False: the job a view just committed can be rendered without a
        # second round trip (and, on SQLite, without re-taking the write lock).
        g.db = Session(engine, expire_on_commit=False)
    session: Session = g.db
    return session


def replica_read(read: Callable[[Session], T], *missing: type[Exception]) -> T:
    """``read(session)`` on the replica when there is one, else on the request's session.

    A replica trails the primary by the time it takes to replay what was written, so a job
    committed a moment ago may not be there yet: when ``read`` raises one of ``missing`` (say
    JobNotFound) on the replica, it reads the primary again, and a job just submitted never reads
    as missing. When the replica fails (it is down, or cancels a query that conflicts with its
    replay: OperationalError), ``read`` runs on the primary, and reads skip the replica for
    REPLICA_RETRY_SECONDS. A read on the primary that met a connection which had died is run
    once more, on a new one. Call it after the caller is known (:mod:`web.auth`)."""
    return _read(read, missing, bare=False)


def replica_connection_read(read: Callable[[Connection], T], *missing: type[Exception]) -> T:
    """As :func:`replica_read`, but ``read`` gets a bare connection in autocommit, checked out
    of the read engine's pool for the call, instead of an ORM Session: for a view that reads a
    few rows with Core statements (a poll), opening, beginning and closing a Session costs
    about as much as the read itself. GET requests only."""
    return _read(read, missing, bare=True)


def _read(read: Callable[[Any], T], missing: tuple[type[Exception], ...], *, bare: bool) -> T:
    svc = services()
    found = svc.replica
    if found is not None and time.monotonic() >= found.skip_until:
        try:
            return _on(read, "replica_db", found.engine, bare)
        except missing:
            pass
        except OperationalError as e:
            _forget("replica_db")
            found.skip_until = time.monotonic() + REPLICA_RETRY_SECONDS
            log.warning(
                "the database replica failed, reads go to the primary for %.0f s: %s",
                REPLICA_RETRY_SECONDS,
                str(e.orig or e).partition("\n")[0],
            )
    try:
        return _on(read, "db", svc.read_engine, bare)
    except DBAPIError as e:
        if not e.connection_invalidated:
            raise
    # A pooled connection had died (PostgreSQL restarted within the moment that pooled
    # connections are trusted without a ping, core.db.session): the pool has been renewed, and
    # a read is safe to run again.
    _forget("db")
    return _on(read, "db", svc.read_engine, bare)


def _on(read: Callable[[Any], T], name: str, engine: Engine, bare: bool) -> T:
    """``read`` on a connection of ``engine`` for the call (``bare``), else on the request's
    session of that name (``db``: :func:`get_session`, whose engine follows the method)."""
    if bare:
        with engine.connect() as connection:
            return read(connection)
    if name == "db":
        return read(get_session())
    session = g.get(name)
    if session is None:
        session = g.setdefault(name, Session(engine, expire_on_commit=False))
    return read(session)


def _forget(name: str) -> None:
    session = g.pop(name, None)
    if session is not None:
        session.close()


def end_reads(session: Session) -> None:
    """End the request's transaction once a read-only view has what it needs, before it builds
    its answer, so that a poll holds no lock while it renders."""
    session.rollback()


def close_session(_exc: BaseException | None = None) -> None:
    for name in ("db", "replica_db"):
        session = g.pop(name, None)
        if session is not None:
            session.close()


def init_app(app: Flask) -> None:
    app.teardown_appcontext(close_session)

"""One database session per request, opened on first use and closed when the request ends.

A view that writes calls ``commit()`` itself, so what a response reports has been committed; a
request that ends with an error rolls back, leaving nothing half-written.

GET and HEAD requests only read, and a client polls its job twice a second, so reads are kept
cheap:

- on PostgreSQL they run in autocommit mode: each statement sees what was committed, and no
  BEGIN and ROLLBACK round trips are paid;
- on SQLite likewise (no BEGIN, so no lock that a writer waits for under WAL); a read-only view
  still ends its session's transaction as soon as it has what it needs (:func:`end_reads`).
"""

from __future__ import annotations

from flask import Flask, g, request
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.db.session import read_only_engine
from web.services import services

READ_METHODS = ("GET", "HEAD")


def read_engine(engine: Engine) -> Engine:
    """The engine that GET requests use: the same pool, without write locks or extra round
    trips (:func:`core.db.session.read_only_engine`)."""
    return read_only_engine(engine)


def get_session() -> Session:
    if "db" not in g:
        svc = services()
        engine = svc.read_engine if request.method in READ_METHODS else svc.engine
        # expire_on_commit=False: the job a view just committed can be rendered without a
        # second round trip (and, on SQLite, without re-taking the write lock).
        g.db = Session(engine, expire_on_commit=False)
    session: Session = g.db
    return session


def end_reads(session: Session) -> None:
    """End the request's transaction once a read-only view has what it needs, before it builds
    its answer, so that a poll holds no lock while it renders."""
    session.rollback()


def close_session(_exc: BaseException | None = None) -> None:
    session = g.pop("db", None)
    if session is not None:
        session.close()


def init_app(app: Flask) -> None:
    app.teardown_appcontext(close_session)

"""The one function through which a job's or a training run's status changes, and the lease
lifecycle built on it: claim, renew, requeue, finish.

Every move is a conditional ``UPDATE … WHERE id = :id AND status IN (:allowed sources)`` whose row
count says whether this caller won. Two workers racing to claim one job both issue the UPDATE;
the database serialises them (PostgreSQL re-checks the WHERE clause of the second once the first
commits, SQLite takes the write lock), so exactly one sees a row count of 1.

A claim raises ``attempts`` by one; that number is the claim's fencing token (Kleppmann, "How to
do distributed locking"). Every write of the worker that holds the claim goes through
:func:`update_held`, :func:`finish` or :func:`requeue` with its :class:`Lease`, whose token is in
the ``WHERE`` clause. A stalled worker whose row was re-queued and claimed again writes nothing:
its token is stale, the row count is 0, and it must stop. Lease and deadline times are computed by
the database (:func:`db_now`), so clock skew between worker machines cannot stretch a lease.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from core.db.models import Job, JobStatus, TrainingRun, UTCDateTime

LeasedModel = type[Job] | type[TrainingRun]

Q, R, S, F, C = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
    JobStatus.CANCELED,
)

# (from, to) pairs that may happen. Terminal states have no way out.
ALLOWED: frozenset[tuple[JobStatus, JobStatus]] = frozenset(
    {
        (Q, R),  # a worker claims it
        (Q, C),  # canceled before it ran
        (Q, F),  # given up: out of attempts, or the model it names is gone
        (R, S),
        (R, F),
        (R, C),  # cancel honoured between steps
        (R, Q),  # retry: the worker was lost or hit a transient error
    }
)


class InvalidTransition(ValueError):
    """A move that the state machine never allows, such as succeeded → running."""


def transition(
    session: Session,
    model: type[Job] | type[TrainingRun],
    row_id: uuid.UUID,
    to: JobStatus,
    *,
    expected: JobStatus | tuple[JobStatus, ...] | None = None,
    fence: int | None = None,
    **values: Any,
) -> bool:
    """Move row ``row_id`` of ``model`` to status ``to``, setting ``values`` in the same UPDATE.

    ``expected`` narrows the source states (default: every state that may move to ``to``); a
    source that could never move to ``to`` raises :class:`InvalidTransition`. Returns True when
    this call made the move, False when the row is absent or was not in a source state: another
    worker claimed it first, or it finished, or it was canceled. With ``fence`` the row must also
    still be at that claim (``attempts == fence``).

    The caller owns the transaction; the move takes effect when it commits.
    """
    sources = {src for (src, dst) in ALLOWED if dst == to}
    if expected is not None:
        wanted = {expected} if isinstance(expected, JobStatus) else set(expected)
        illegal = wanted - sources
        if illegal:
            names = ", ".join(sorted(s.value for s in illegal))
            raise InvalidTransition(f"{model.__tablename__}: {names} → {to.value} is not allowed")
        sources = wanted
    if not sources:
        raise InvalidTransition(f"{model.__tablename__}: nothing may move to {to.value}")
    where = [model.id == row_id, model.status.in_(sorted(sources))]
    if fence is not None:
        where.append(model.attempts == fence)
    statement = (
        update(model)
        .where(*where)
        .values(status=to, **values)
        .execution_options(synchronize_session=False)
    )
    result = session.execute(statement)
    moved = result.rowcount == 1  # type: ignore[attr-defined]
    if moved:
        # Objects already loaded in this session must not keep the old status.
        obj = session.identity_map.get(identity_key(model, row_id))
        if obj is not None:
            session.expire(obj)
    return moved


def transition_job(session: Session, job_id: uuid.UUID, to: JobStatus, **kw: Any) -> bool:
    """:func:`transition` for generation jobs."""
    return transition(session, Job, job_id, to, **kw)


def transition_run(session: Session, run_id: uuid.UUID, to: JobStatus, **kw: Any) -> bool:
    """:func:`transition` for training runs."""
    return transition(session, TrainingRun, run_id, to, **kw)


# --- the database's clock ----------------------------------------------------------------------


class db_now(FunctionElement[datetime]):  # lower case: it reads as the SQL function it is
    """The database's current time, optionally ``seconds`` ahead, as a UTC timestamp.

    Lease and deadline times are computed by the one database every worker shares, never by a
    worker's own clock."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0.0):
        self.seconds = float(seconds)
        super().__init__()


@compiles(db_now, "postgresql")
def _db_now_postgresql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # now() is the transaction's start; the transactions here last milliseconds.
    if not element.seconds:
        return "now()"
    return f"(now() + make_interval(secs => {element.seconds!r}))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # The text format SQLAlchemy stores UTC datetimes in, so comparisons stay textual and exact
    # to the millisecond.
    shift = f", '{element.seconds:+.3f} seconds'" if element.seconds else ""
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now'{shift})"


@compiles(db_now)
def _db_now_default(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


# --- the lease lifecycle ---------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """A claim on one row: what every write of the claiming worker carries."""

    model: LeasedModel
    id: uuid.UUID
    token: int  # ``attempts`` after the claim

    @property
    def noun(self) -> str:
        return "job" if self.model is Job else "training run"


class LeaseLost(Exception):
    """This worker's claim on a row is gone (re-queued and claimed again, canceled, finished
    elsewhere): stop the work and write nothing more."""

    def __init__(self, lease: Lease):
        super().__init__(f"lost {lease.noun} {lease.id} (attempt {lease.token})")
        self.lease = lease


def claim(
    session: Session,
    model: LeasedModel,
    row_id: uuid.UUID,
    *,
    host: str,
    lease_seconds: float,
    time_limit_seconds: float,
    **values: Any,
) -> Lease | None:
    """Claim a queued row: running, one more attempt, a lease and a deadline from the database's
    clock. Returns the lease, or None when the row was not queued (another worker took it, it was
    canceled, or this is a duplicate message)."""
    moved = transition(
        session,
        model,
        row_id,
        JobStatus.RUNNING,
        expected=JobStatus.QUEUED,
        worker_host=host,
        attempts=model.attempts + 1,
        lease_expires_at=db_now(lease_seconds),
        deadline_at=db_now(time_limit_seconds),
        error=None,
        **values,
    )
    if not moved:
        return None
    token = session.scalar(select(model.attempts).where(model.id == row_id))
    assert token is not None
    return Lease(model, row_id, token)


def _held(lease: Lease) -> list[ColumnElement[bool]]:
    model = lease.model
    return [model.id == lease.id, model.status == JobStatus.RUNNING, model.attempts == lease.token]


def update_held(session: Session, lease: Lease, **values: Any) -> bool:
    """Set ``values`` on a row this lease still holds; False when the lease is lost."""
    result = session.execute(
        update(lease.model)
        .where(*_held(lease))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def still_held(session: Session, lease: Lease) -> bool:
    return session.scalar(select(lease.model.id).where(*_held(lease))) is not None


def renew(session: Session, lease: Lease, lease_seconds: float) -> bool | None:
    """Push the lease forward, unless its deadline has passed. True: renewed; None: still held
    but past its deadline (the watchdog and the reaper end it); False: lost."""
    model = lease.model
    result = session.execute(
        update(model)
        .where(*_held(lease), or_(model.deadline_at.is_(None), model.deadline_at > db_now()))
        .values(lease_expires_at=db_now(lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return True
    return None if still_held(session, lease) else False


def _requeue_values(model: LeasedModel) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        worker_host=None, lease_expires_at=None, deadline_at=None, published_at=None
    )
    if model is Job:
        # One clean restart for a poller: progress starts again from 0 with the next claim.
        values |= dict(progress_step=0, preview_key=None)
    return values


def finish(
    session: Session, lease: Lease, to: JobStatus, *, error: str | None = None, **values: Any
) -> bool:
    """End the held row as succeeded, failed or canceled; False when the lease is lost. A job's
    preview goes with its end (only a running job shows one; retention deletes the object)."""
    if lease.model is Job:
        values.setdefault("preview_key", None)
    return transition(
        session,
        lease.model,
        lease.id,
        to,
        expected=JobStatus.RUNNING,
        fence=lease.token,
        finished_at=db_now(),
        lease_expires_at=None,
        error=error,
        **values,
    )


def requeue(session: Session, lease: Lease) -> bool:
    """Hand the held row back to the queue (its message is re-published by the caller or the
    relay); False when the lease is lost."""
    return transition(
        session,
        lease.model,
        lease.id,
        JobStatus.QUEUED,
        expected=JobStatus.RUNNING,
        fence=lease.token,
        **_requeue_values(lease.model),
    )


def time_limit_error(limit_seconds: float) -> str:
    return f"ran past the {limit_seconds:g} s time limit"


def reap(session: Session, model: LeasedModel, max_attempts: int) -> dict[str, list[uuid.UUID]]:
    """The reaper's pass over ``model``: running rows whose lease ran out (by the database's
    clock). A row past its deadline ends as its time limit says (a job fails naming the limit; a
    training run goes back to the queue to resume from its last checkpoint); any other is
    re-queued, or failed once it has used ``max_attempts``. Each move is fenced by the attempt the
    reaper saw, so a row claimed again meanwhile is left alone."""
    rows = session.execute(
        select(
            model.id,
            model.attempts,
            model.started_at,
            model.deadline_at,
            # Judged by the database's clock too, in the same statement.
            and_(model.deadline_at.is_not(None), model.deadline_at <= db_now()).label("overdue"),
        )
        .where(model.status == JobStatus.RUNNING, model.lease_expires_at < db_now())
        .order_by(model.lease_expires_at)
        .limit(500)
    ).all()
    outcome: dict[str, list[uuid.UUID]] = {"requeued": [], "failed": []}
    for row in rows:
        lease = Lease(model, row.id, row.attempts)
        if row.overdue and model is Job:
            limit = (
                (row.deadline_at - row.started_at).total_seconds()
                if row.started_at and row.deadline_at
                else 0
            )
            if finish(session, lease, JobStatus.FAILED, error=time_limit_error(round(limit))):
                outcome["failed"].append(row.id)
        elif row.attempts >= max_attempts and not row.overdue:
            error = (
                f"the worker running this {lease.noun} stopped responding ({row.attempts} of "
                f"{max_attempts} attempts used); giving up"
            )
            if finish(session, lease, JobStatus.FAILED, error=error):
                outcome["failed"].append(row.id)
        elif requeue(session, lease):
            outcome["requeued"].append(row.id)
    return outcome

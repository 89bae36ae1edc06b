"""The one function through which a job's or a training run's status changes.

Every move is a conditional ``UPDATE … WHERE id = :id AND status IN (:allowed sources)`` whose row
count says whether this caller won. Two workers racing to claim one job both issue the UPDATE;
the database serialises them (PostgreSQL re-checks the WHERE clause of the second once the first
commits, SQLite takes the write lock), so exactly one sees a row count of 1.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from core.db.models import Job, JobStatus, TrainingRun

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
    **values: Any,
) -> bool:
    """Move row ``row_id`` of ``model`` to status ``to``, setting ``values`` in the same UPDATE.

    ``expected`` narrows the source states (default: every state that may move to ``to``); a
    source that could never move to ``to`` raises :class:`InvalidTransition`. Returns True when
    this call made the move, False when the row is absent or was not in a source state: another
    worker claimed it first, or it finished, or it was canceled.

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
    statement = (
        update(model)
        .where(model.id == row_id, model.status.in_(sorted(sources)))
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
